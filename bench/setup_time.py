"""Setup time on the tiny model with and without the warm-up (issue 13, point 4): `Service.from_settings` in this
process, then the real Cog server from start to READY. Alternating runs after one untimed; medians and ranges.

    .venv/bin/python bench/setup_time.py [--repeats 5] [--server-repeats 3]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from idefics_cog.config import Settings  # noqa: E402
from idefics_cog.serving.service import Service  # noqa: E402
from idefics_dev import tiny  # noqa: E402
from idefics_dev.cogrunner import CogServer  # noqa: E402


def timed(start, repeats: int) -> dict:
    """Seconds of `start(warmup)` for IDEFICS_WARMUP 0 and 1, alternating."""
    found = {"0": [], "1": []}
    for _ in range(repeats):
        for warmup in found:
            began = time.perf_counter()
            start(warmup)
            found[warmup].append(time.perf_counter() - began)
    return found


def report(what: str, found: dict) -> None:
    for warmup, seconds in found.items():
        print(f"{what}, IDEFICS_WARMUP={warmup}: median {statistics.median(seconds):.3f} s "
              f"({min(seconds):.3f}-{max(seconds):.3f} s, {len(seconds)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--server-repeats", type=int, default=3)
    args = parser.parse_args()
    folder = tiny.build(ROOT / "weights" / "tiny")
    env = {"IDEFICS_BASE_WEIGHTS": str(folder / "base"), "IDEFICS_ADAPTER_WEIGHTS": str(folder / "adapter")}

    def in_process(warmup: str) -> None:
        Service.from_settings(Settings.from_env({**env, "IDEFICS_WARMUP": warmup}))

    def server(warmup: str) -> None:
        with CogServer(env={**env, "IDEFICS_WARMUP": warmup}):
            pass

    in_process("0")  # imports and the file cache, untimed
    report("Service.from_settings", timed(in_process, args.repeats))
    report("Cog server start to READY", timed(server, args.server_repeats))


if __name__ == "__main__":
    main()
