"""What inductor's generated CPU code allocates: the check that a compiled step writes its caches in place."""

import math
import re


def buffers_at_least(code: list[str], values: int) -> list[list[int]]:
    """The shapes of the buffers `code` (run_and_get_code's) allocates with at least `values` values: a copy of a
    cache shows as one (a symbolic size counts as 2, its least value in a dynamic graph)."""
    shapes = [[int(n) if n.strip().isdigit() else 2 for n in shape.split(",") if n.strip()]
              for shape in re.findall(r"empty_strided_cpu\(\(([^)]*)\)", "\n".join(code))]
    return [shape for shape in shapes if math.prod(shape) >= values]
