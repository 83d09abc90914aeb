"""`python -m idefics_cog.weights` (`script/download-weights`): fill the cache with the configured weights before
`cog push`, so they can be baked into the image."""

import argparse
import logging
import sys
from typing import Optional

from idefics_cog.config import Settings
from idefics_cog.weights.base import WeightsError
from idefics_cog.weights.resolve import resolve


EXAMPLE = """example:
  IDEFICS_BASE_WEIGHTS=HuggingFaceM4/idefics-9b-instruct IDEFICS_ADAPTER_WEIGHTS=none idefics-cog download"""


def main(argv: Optional[list[str]] = None, prog: str = "idefics-cog download") -> int:
    argparse.ArgumentParser(
        prog=prog, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download the weights named by IDEFICS_BASE_WEIGHTS and IDEFICS_ADAPTER_WEIGHTS into the weights "
        "folder (IDEFICS_CACHE_DIR, weights/ by default) so that `cog push` bakes them into the image.",
    ).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"download-weights: {exc}", file=sys.stderr)
        return 2
    sources = [("base", settings.base_weights)] + ([("adapter", settings.adapter_weights)]
                                                   if settings.adapter_weights else [])  # "" when `none`
    for role, source in sources:
        try:
            path = resolve(source, settings.cache_dir, adapter=role == "adapter")
        except WeightsError as exc:
            print(f"download-weights: {role} weights: {exc}", file=sys.stderr)
            return 1
        print(f"{role}: {source} -> {path}", flush=True)
    return 0


if __name__ == "__main__":  # `python -m idefics_cog.weights`: an alias of `idefics-cog download`
    sys.exit(main(prog="python -m idefics_cog.weights"))
