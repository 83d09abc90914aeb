"""One decode step on bench-small at batch 1, 4 and 16, every row with the default adapter (bench-small's LoRA, r=16
on q/k/v, as MedIDEFICS): eager (the columns and layers of the banks in use), eager with the banks whole (the
compiled step's work), and compiled into one graph (torch.compile with inductor's CPU kernels, the production step
with IDEFICS_COMPILE=on) in the same run; the compile's graphs, graph breaks, recompilations after
the warm-up (set to raise), and whether inductor's code copies a cache (it must write it in place). Optionally the
torch profiler's table for the eager batch-16 step.

    .venv/bin/python bench/decode_step.py [--threads 2] [--steps 40] [--eager-only] [--profile]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch._inductor.utils import run_and_get_code  # noqa: E402

from idefics_cog.inputs.prompt import build_segments, encode  # noqa: E402
from idefics_cog.serving.decoder import FastDecoder  # noqa: E402
from idefics_cog.serving.engine import Engine  # noqa: E402
from idefics_cog.serving.adapters import Adapters  # noqa: E402
from idefics_dev import tiny  # noqa: E402
from tests.support.helpers import noise_image  # noqa: E402
from tests.support.inductor import buffers_at_least  # noqa: E402

BATCHES = (1, 4, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eager-only", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    folder = tiny.build(ROOT / "weights" / "bench-small", "bench-small")
    engine = Engine.load(folder / "base", "cpu", decode_path="fast", max_batch=max(BATCHES), compile="off")
    with tempfile.TemporaryDirectory() as cache:
        adapters = Adapters(engine, Path(cache))
        adapters.load_default(str(folder / "adapter"))
        engine.run(adapters.select, "medical")
    engine.run(measure, engine, args)  # on the engine's thread, as a server decodes (engine.TorchThread)


def measure(engine: Engine, args) -> None:
    torch.set_num_threads(args.threads)
    model, eager = engine.model, engine.scheduler.decoder
    enc = encode(build_segments("Describe the picture in detail please " * 6, 1), [noise_image(1)], engine.processor)
    print(f"bench-small, prompt {enc.num_tokens} tokens, {args.threads} torch threads, torch {torch.__version__}\n")
    decoders = {"eager": eager, "eager, whole banks": whole_banks(engine)}
    if not args.eager_only:
        decoders["compiled"], report = compiled_decoder(engine)
    medians = {name: timed(decoder, model, enc, args.steps) for name, decoder in decoders.items()}
    if not args.eager_only:
        print(report)
        recompiles = counters["stats"]["unique_graphs"] - report.graphs_after_warm_up
        print(f"- recompilations while timing (error_on_recompile set): {recompiles}\n")
    ratios = [("compiled", "eager, whole banks"), ("compiled", "eager")] if "compiled" in medians else []
    print("| batch | " + " | ".join(f"{name} step" for name in medians) + "".join(f" | {a} / {b}" for a, b in ratios)
          + " |")
    print("|---:|" + "---:|" * (len(medians) + len(ratios)))
    for batch in BATCHES:
        cells = [f"{1000 * medians[name][batch]:.2f} ms" for name in medians]
        cells += [f"{medians[a][batch] / medians[b][batch]:.2f}x" for a, b in ratios]
        print(f"| {batch} | " + " | ".join(cells) + " |")
    if args.profile:
        from torch.profiler import profile

        with profile() as profiled:
            for index in range(20):
                eager.decode(model, [5] * max(BATCHES), [enc.num_tokens + index] * max(BATCHES))
        print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


class CompileReport:
    def __init__(self, decoder, warm, code: list[str], started: float):
        self.graphs_after_warm_up = counters["stats"]["unique_graphs"]
        self.warm, self.seconds = warm, time.perf_counter() - started
        self.breaks = sum(counters["graph_break"].values())
        self.copies = buffers_at_least(code, decoder.keys[0].numel())  # one layer's keys for every slot

    def __str__(self) -> str:
        return (f"- compiled: {self.warm.graphs} graph(s) in the warm-up of {self.warm.shapes} batch x length "
                f"shapes, {self.seconds:.0f} s (inductor's C++ kernels on this CPU); graph breaks: {self.breaks}\n"
                f"- buffers as large as a layer's cache in inductor's code (a cache copied, not written in place): "
                f"{len(self.copies)} {self.copies or ''}")


def whole_banks(engine: Engine) -> FastDecoder:
    """An eager step doing the compiled step's work: every bank column on every decode layer (the production eager
    step computes only the columns and layers its rows' adapters use)."""
    decoder = FastDecoder(engine.model, max(BATCHES), 1, compile="off", banned_ids=engine.banned_ids)
    decoder.lora.in_use = lambda rows: (decoder.lora.bank_rank, None)
    return decoder


def compiled_decoder(engine: Engine):
    """The production compiled step on the same model, warmed up at every bucket; what the compile did."""
    torch._dynamo.reset()
    counters.clear()
    started = time.perf_counter()
    decoder = FastDecoder(engine.model, max(BATCHES), 1, compile="on", banned_ids=engine.banned_ids)
    warm, code = run_and_get_code(decoder.warm_up, engine.model)
    report = CompileReport(decoder, warm, code, started)
    torch._dynamo.config.error_on_recompile = True  # timing below must not compile anything
    return decoder, report


def timed(decoder: FastDecoder, model, enc, steps: int) -> dict[int, float]:
    """The median seconds of a step per batch, with every slot prefilled (as `engine.stream` sees it)."""
    with torch.inference_mode():
        for slot in range(max(BATCHES)):
            decoder.prefill(model, slot, enc)
    medians = {}
    for batch in BATCHES:
        seconds = []
        for index in range(5 + steps):
            began = time.perf_counter()
            decoder.decode(model, [5] * batch, [enc.num_tokens + index] * batch)
            seconds.append(time.perf_counter() - began)
        medians[batch] = statistics.median(seconds[5:])
    return medians


if __name__ == "__main__":
    main()
