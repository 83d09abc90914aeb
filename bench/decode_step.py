"""One `FastDecoder.decode` step on bench-small at batch 1, 4 and 16, with the torch threads given, and optionally
the torch profiler's table for batch 16 (issue 13, point 6: where a batch-16 step's time goes).

    .venv/bin/python bench/decode_step.py [--threads 2] [--steps 40] [--profile]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import torch  # noqa: E402

from idefics_cog.inputs.prompt import build_segments, encode  # noqa: E402
from idefics_cog.serving.engine import Engine  # noqa: E402
from idefics_dev import tiny  # noqa: E402
from tests.support.helpers import noise_image  # noqa: E402

BATCHES = (1, 4, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    base = tiny.build(ROOT / "weights" / "bench-small", "bench-small") / "base"
    engine = Engine.load(base, "cpu", engine="fast", max_batch=max(BATCHES))
    engine.run(measure, engine, args)  # on the engine's thread, as a server decodes (engine.TorchThread)


def measure(engine: Engine, args) -> None:
    torch.set_num_threads(args.threads)
    model, decoder = engine.model, engine.scheduler.decoder
    enc = encode(build_segments("Describe the picture in detail please " * 6, 1),
                 [noise_image(1)], engine.processor)
    with torch.inference_mode():
        for slot in range(max(BATCHES)):
            decoder.prefill(model, slot, enc)

        def step(batch: int, index: int) -> None:
            decoder.decode(model, [5] * batch, [enc.num_tokens + index] * batch)

        print(f"bench-small, prompt {enc.num_tokens} tokens, {args.threads} torch threads")
        for batch in BATCHES:
            for index in range(5):
                step(batch, index)
            seconds = []
            for index in range(args.steps):
                began = time.perf_counter()
                step(batch, index)
                seconds.append(time.perf_counter() - began)
            print(f"batch {batch}: median {1000 * statistics.median(seconds):.2f} ms per step")
        if args.profile:
            from torch.profiler import profile

            with profile() as profiled:
                for index in range(20):
                    step(max(BATCHES), index)
            print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
