"""The compiled decode step: whether (decided once, at setup), its settings and the few shapes it runs at."""

import threading
from collections import defaultdict
from dataclasses import dataclass

import torch


def compile_decision(base, setting: str | bool) -> tuple[bool, str]:
    """(compiled, why) for IDEFICS_COMPILE."""
    setting = {True: "on", False: "off"}.get(setting, setting)
    if setting == "off":
        return False, "IDEFICS_COMPILE=off"
    quantized = sorted({type(m).__name__ for m in base.modules()
                        if type(m).__name__ in ("Linear8bitLt", "Linear4bit")})
    if quantized:
        return False, f"bitsandbytes layers ({', '.join(quantized)}) cannot be captured in one graph"
    if setting == "on":
        return True, "IDEFICS_COMPILE=on" + ("" if base.device.type == "cuda" else
                                             " (inductor's CPU kernels, no CUDA graphs)")
    if base.device.type == "cuda":
        return True, "CUDA: one graph per step, captured once per batch and length bucket (torch.compile, CUDA graphs)"
    return False, f"IDEFICS_COMPILE=auto compiles on CUDA only, this is {base.device.type}"


def compile_step(step, device: torch.device, backend, static: tuple):
    """One graph (a graph break is an error), captured as CUDA graphs on CUDA. `static`: tensors at fixed addresses."""
    for tensor in static:
        torch._dynamo.mark_static_address(tensor)
    # Room for a few decoders in one process (tests); past that an error, never torch's quiet eager fallback.
    torch.compiler.config.recompile_limit = max(torch.compiler.config.recompile_limit, 64)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    cuda_graphs = device.type == "cuda" and backend == "inductor"
    return torch.compile(step, fullgraph=True, backend=backend, mode="reduce-overhead" if cuda_graphs else None)


def batch_bucket(count: int, max_batch: int) -> int:
    """A power of two, at least 2: torch specializes size 1 into a graph of its own."""
    return min(max_batch, max(2, 1 << (count - 1).bit_length()))


def length_bucket(length: int, max_len: int) -> int:
    """The attended KV cache length rounded up to a power of two, at least 256."""
    return min(max_len, max(256, 1 << (length - 1).bit_length()))


def buckets(max_batch: int, max_len: int) -> list[tuple[int, int]]:
    batches = sorted({batch_bucket(count, max_batch) for count in range(1, max_batch + 1)})
    lengths = sorted({length_bucket(length, max_len) for length in range(1, max_len + 1, 128)}
                     | {length_bucket(max_len, max_len)})
    return [(batch, length) for length in lengths for batch in batches]


def cuda_graphs_on_this_thread() -> None:
    """torch 2.11: CUDA graph trees set up their per-thread state only in the importing thread, and a replay on the
    torch thread fails an assertion without this (2.13 does it itself; kept for bench/gpu.sh's older torch)."""
    try:
        from torch._inductor.cudagraph_trees import local
    except (ImportError, AttributeError):
        return
    if not hasattr(local, "tree_manager_containers"):
        local.tree_manager_containers = {}
        local.tree_manager_locks = defaultdict(threading.Lock)


@dataclass
class Step:
    """Float32 logits (banned ids at -inf) and their argmax, on the device."""

    logits: torch.Tensor
    tokens: torch.Tensor


@dataclass
class WarmUp:
    shapes: int  # batch x length buckets run
    graphs: int  # graphs compiled
    seconds: float
