"""The GPU loan's measurements, in phases that each write their results (Markdown and JSON) as soon as they end, so
that a run stopped by its time limit keeps what was done. Run by bench/gpu.sh, which gives each command a hard
`timeout`; `--deadline` (Unix time) lets a command skip the phases that cannot end in time instead of being killed.

  check   float32, the idefics-9b's real widths with few layers (4 decoder layers, 1 gated cross-attention block,
          2 vision layers; vocabulary 32000 + 2; random weights): the fast path's greedy tokens (compiled on CUDA)
          against plain `model.generate` on the same input ids: one request alone (stopping at the end of turn, and
          over all new tokens with ignore_eos), then 4 concurrent requests each against itself alone. Exit 1 if any
          token differs. The 9b itself is never built in float32.
  speed   the random idefics-9b at its real size in bf16 (built on the GPU, as bench/speed.py --real-size does):
          model build, the first request (compiling batch 1), the decoder's warm-up (`decoder.warm_up`, the other
          decode shapes), batch-1 decode tokens/s and time to first token against the model-card recipe
          (`model.generate`) in the same run, its share of the memory-bandwidth floor, 16 concurrent requests
          against one stream, and 16 rows with 4 different LoRA adapters against 16 rows of one adapter.

Every phase reports the decode step that ran (`decoder.step_mode`/`step_mode_reason`, or whether `decoder.compiled`
is set), the graphs compiled and graph breaks (torch._dynamo's counters) and the recompilations logged during the phase.

    python bench/gpu_bench.py check|speed --out DIR [--device cuda|cpu] [--size real|tiny] [--deadline UNIX_TIME]

`--size tiny` (with `--device cpu`) runs the same code on the scaled-down idefics-9b shape (`idefics_9b_config(
smoke=True)`): tests/bench/test_gpu_bench.py runs bench/gpu.sh that way so that this script cannot rot.
"""

import argparse
import inspect
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import torch  # noqa: E402
import transformers  # noqa: E402

from bench.speed import (TORCH, bandwidth, concurrent_run, decode_bytes, engine_run, first_difference,  # noqa: E402
                         free_memory, make_request, new_engine, real_size_model, recipe_run, stream_together)
from bench.stats import machine  # noqa: E402
from idefics_cog.serving.jobs import Job, Sampling  # noqa: E402
from idefics_dev.tiny import random_lora  # noqa: E402

CHECK_LAYERS = 4  # decoder layers of the float32 check model: one gated cross-attention block (interval 4)
ADAPTERS = 4  # different custom adapters in the mixed batch


# --- results, written after every phase ---------------------------------------------------------------------------


class Report:
    """One command's phases: `DIR/<command>.md` rewritten and `DIR/results.json` updated after each phase."""

    def __init__(self, out: Path, command: str, title: str, deadline: float | None):
        self.out, self.command, self.title, self.deadline = out, command, title, deadline
        self.lines: list[str] = []
        self.data: dict = dict(status="running", info={}, phases={})
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def fits(self, name: str, seconds: float) -> bool:
        """Whether a phase expected to take `seconds` can end before the deadline; if not, it is recorded as skipped."""
        if self.left() >= seconds:
            return True
        self.phase(name, dict(skipped=f"{self.left():.0f} s left, about {seconds:.0f} s needed"),
                   [f"- **{name}**: skipped ({self.left():.0f} s left, about {seconds:.0f} s needed)"])
        return False

    def phase(self, name: str, data: dict, lines: list[str]) -> None:
        self.data["phases"][name] = data
        self.lines += lines
        self.write()

    def write(self, status: str | None = None) -> None:
        if status:
            self.data["status"] = status
        (self.out / f"{self.command}.md").write_text(
            f"## {self.title}\n\n" + "\n".join(self.lines) + f"\n\nStatus: {self.data['status']}.\n")
        path = self.out / "results.json"
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged[self.command] = self.data
        path.write_text(json.dumps(merged, indent=2, default=str) + "\n")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- what torch.compile did ----------------------------------------------------------------------------------------


class Compiles:
    """torch._dynamo's counters (graphs compiled, graph breaks) and its recompilation log, read per phase."""

    def __init__(self, log_recompiles: bool):
        self.recompiles: list[str] = []
        try:
            if not log_recompiles:  # nothing compiles: leave torch's logging alone
                raise RuntimeError("no compilation")
            # The "recompiles" log artifact: one record per recompilation, with its reason.
            torch._logging.set_logs(recompiles=True)
            handler = logging.Handler()
            handler.emit = lambda record: self.recompiles.append(record.getMessage()[:300])
            recompiles = logging.getLogger("torch._dynamo.guards.__recompiles")
            recompiles.addHandler(handler)
            recompiles.propagate = False
        except Exception as exc:  # an older or newer torch without it: the graph counts still tell
            progress(f"recompilations not logged: {exc}")
        self.mark()

    @staticmethod
    def counts() -> dict:
        from torch._dynamo.utils import counters

        breaks = counters.get("graph_break", {})
        return dict(graphs=int(counters.get("stats", {}).get("unique_graphs", 0)),
                    graph_breaks=int(sum(breaks.values())), break_reasons=[str(r)[:200] for r in list(breaks)[:5]])

    def mark(self) -> None:
        self.start, self.seen = self.counts(), len(self.recompiles)

    def since(self) -> dict:
        """Graphs and breaks since the last `mark`, and the recompilations logged meanwhile; marks again."""
        now = self.counts()
        found = dict(graphs_compiled=now["graphs"] - self.start["graphs"],
                     graph_breaks=now["graph_breaks"] - self.start["graph_breaks"],
                     break_reasons=now["break_reasons"], recompiles=self.recompiles[self.seen:][:10],
                     recompile_count=len(self.recompiles) - self.seen)
        self.mark()
        return found


def path_of(engine) -> dict:
    """The decode step in use: the decoder's own words where it has them (`step_mode`, `step_mode_reason`), else
    whether its compiled step is set."""
    decoder = engine.scheduler.decoder
    if decoder is None:
        return dict(path="model.generate", reason="no fast decoder (decode_path='transformers')")
    path = getattr(decoder, "step_mode", None) or ("compiled" if getattr(decoder, "compiled", None) is not None else
                                              "eager")
    return dict(path=path, reason=getattr(decoder, "step_mode_reason", "(not available)"))


def compile_line(found: dict, path: dict) -> str:
    recompiles = f"; recompilations: {found['recompile_count']}" + (
        f" ({found['recompiles'][0]})" if found["recompiles"] else "")
    breaks = f" ({found['break_reasons'][0]})" if found["graph_breaks"] and found["break_reasons"] else ""
    return (f"decode path {path['path']} ({path['reason']}); graphs compiled {found['graphs_compiled']}, "
            f"graph breaks {found['graph_breaks']}{breaks}{recompiles}")


def engine_for(model, processor, kind: str, max_batch: int, compile: str):
    """An engine on the benchmark's torch thread; `compile` goes to it where the engine takes it (the decoder's
    contract: "auto", "on" or "off"), else the engine's default (compiled on CUDA)."""
    options = dict(decode_path=kind, max_batch=max_batch)
    from idefics_cog.serving.engine import Engine

    if "compile" in inspect.signature(Engine.__init__).parameters:
        options["compile"] = compile
    return new_engine(model, processor, **options)


def compiling(args) -> bool:
    return args.compile == "on" or (args.compile == "auto" and args.device == "cuda")


def build(size: str, device: str, dtype: torch.dtype, layers: int | None = None):
    return TORCH.run(real_size_model, size == "tiny", dtype, device=device, layers=layers)


def machine_info(device: str, model, what: str) -> dict:
    return machine() | dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "CPU", model=what,
        parameters=sum(p.numel() for p in model.parameters()), dtype=str(model.dtype).removeprefix("torch."))


def header(info: dict) -> str:
    return (f"{info['model']}: {info['parameters'] / 1e6:.0f} M parameters in {info['dtype']} on {info['device']}; "
            f"torch {info['torch']}, transformers {info['transformers']}, Python {info['python']}.")


# --- check: the compiled path's greedy tokens against model.generate, float32 --------------------------------------


def check(args, report: Report) -> bool:
    compiles = Compiles(compiling(args))
    started = time.perf_counter()
    model, processor, what = build(args.size, args.device, torch.float32, CHECK_LAYERS)
    report.data["info"] = info = machine_info(args.device, model, what)
    baseline = engine_for(model, processor, "transformers", 1, args.compile)
    rows = min(4, args.concurrent)  # batched rows checked against each alone
    fast = engine_for(model, processor, "fast", rows, args.compile)
    report.phase("build", dict(seconds=time.perf_counter() - started),
                 [header(info), "", f"- **build**: {time.perf_counter() - started:.1f} s"])
    ok, n = True, args.new_tokens
    requests = [make_request(baseline, i) for i in range(rows)]
    for name, alone, ignore_eos in (
            ("alone, stops at end of turn (model_card_generate)", lambda r: recipe_run(baseline, r, n, False), False),
            ("alone, ignore_eos (model.generate)", lambda r: engine_run(baseline, r, n), True)):
        if not report.fits(name, args.slack + n / 10):
            return ok
        started = time.perf_counter()
        expected, got = alone(requests[0]).ids, engine_run(fast, requests[0], n, ignore_eos).ids
        same = got == expected
        ok &= same
        found, path = compiles.since(), path_of(fast)
        at = first_difference(got, expected)
        report.phase(name, dict(same=same, tokens=len(expected), first_difference=None if same else at,
                                seconds=time.perf_counter() - started, path=path, **found),
                     [f"- **{name}**: {'same' if same else 'DIFFERENT'} tokens ({len(expected)} compared"
                      + ("" if same else f", first difference at {at}: fast {got[at:at + 6]}, generate "
                                         f"{expected[at:at + 6]}") + f"); {compile_line(found, path)}"])
    name = f"{rows} concurrent (ignore_eos), each against model.generate alone"
    if report.fits(name, args.slack + n / 5):
        started = time.perf_counter()
        prompts = [baseline.encode(r.segments, r.images) for r in requests]
        _, _, batched = concurrent_run(fast, prompts, n)
        alone = [engine_run(baseline, r, n).ids for r in requests]
        same = sum(a == b for a, b in zip(batched, alone))
        ok &= same == len(alone)
        found, path = compiles.since(), path_of(fast)
        report.phase(name, dict(same=same, requests=len(alone), seconds=time.perf_counter() - started, path=path,
                                **found),
                     [f"- **{name}**: {same}/{len(alone)} the same; {compile_line(found, path)}"])
    return ok


# --- speed: the real-size model in bf16 ----------------------------------------------------------------------------


def bytes_per_token(model, prompt_tokens: int, new_tokens: int) -> dict:
    """What decoding one token must read, at the least: the weights it needs (speed.decode_bytes) and the cache
    it attends to: keys and values of the average context of this request in every layer, and one image's keys
    and values in every gated cross-attention block."""
    config, item = model.config, model.dtype.itemsize
    context = prompt_tokens + new_tokens / 2
    cross_blocks = config.num_hidden_layers // config.cross_layer_interval
    image = config.perceiver_config.resampler_n_latents if config.use_resampler else \
        (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
    cache = 2 * config.hidden_size * item * (config.num_hidden_layers * context + cross_blocks * image)
    return dict(weights=decode_bytes(model), cache=int(cache))


def floor_of(device: str, read: dict, rate: float) -> tuple[dict, str]:
    total = read["weights"] + read["cache"]
    peak = bandwidth(torch.device(device))
    data = dict(read, bandwidth=peak)
    line = (f"reads {read['weights'] / 1e9:.2f} GB of weights and {read['cache'] / 1e9:.3f} GB of cache per token")
    if not peak:
        return data, line + " (no datasheet bandwidth for this device)"
    data.update(floor_weights=peak / read["weights"], floor=peak / total, share=rate * total / peak)
    return data, line + (f": at {peak / 1e12:.2f} TB/s at most {peak / total:.0f} tokens/s "
                         f"({peak / read['weights']:.0f} counting the weights alone); decode_path='fast' decodes at "
                         f"**{rate * total / peak:.0%}** of it")


def med(values) -> float:
    return statistics.median(values) if values else float("nan")


def speed(args, report: Report) -> bool:
    compiles = Compiles(compiling(args))
    started = time.perf_counter()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, processor, what = build(args.size, args.device, dtype)
    report.data["info"] = info = machine_info(args.device, model, what)
    baseline = engine_for(model, processor, "transformers", 1, args.compile)
    fast = engine_for(model, processor, "fast", args.concurrent, args.compile)
    built = time.perf_counter() - started
    report.phase("build", dict(seconds=built), [header(info), "", f"- **build** (model and engines): {built:.1f} s"])
    request, n = make_request(baseline, 0), args.new_tokens

    # The first request compiles the batch-1 decode step; the decoder's warm-up then the other shapes.
    started = time.perf_counter()
    engine_run(fast, request, 8)
    first = time.perf_counter() - started
    found, path = compiles.since(), path_of(fast)
    report.phase("first request", dict(seconds=first, path=path, **found),
                 [f"- **first request** (8 tokens, compiles batch 1): {first:.1f} s; {compile_line(found, path)}"])
    decoder = fast.scheduler.decoder
    # The step is one graph with dynamic shapes: the warm-up's other shapes record CUDA graphs, compiling little. A
    # decoder that compiled each shape apart would take about the first request's time per shape: the deadline and
    # bench/gpu.sh's timeout bound that case.
    estimate = first
    if args.warm_up == "on" or (args.warm_up == "auto" and report.left() > estimate + args.reserve):
        started = time.perf_counter()
        result = fast.run(decoder.warm_up, fast.model)
        seconds = time.perf_counter() - started
        shapes, graphs = getattr(result, "shapes", result), getattr(result, "graphs", None)
        found, path = compiles.since(), path_of(fast)
        report.phase("warm-up", dict(seconds=seconds, shapes=shapes, graphs=graphs,
                                     own_seconds=getattr(result, "seconds", None), path=path, **found),
                     [f"- **warm-up** (`decoder.warm_up`): {seconds:.1f} s, shapes {shapes}, graphs "
                      f"{graphs if graphs is not None else '(not reported)'}; {compile_line(found, path)}"])
    else:
        report.phase("warm-up", dict(skipped=f"about {estimate:.0f} s expected, {report.left():.0f} s left"),
                     [f"- **warm-up**: skipped (about {estimate:.0f} s expected, {report.left():.0f} s left, "
                      f"{args.reserve:.0f} s kept for the measurements); shapes compile at first use below"])
    compiles.mark()

    name = "batch 1"
    if report.fits(name, args.slack + 2 * n / 25 * (args.repeats + 1)):
        paths = {"recipe (model.generate)": lambda: recipe_run(baseline, request, n),
                 "decode_path='fast'": lambda: engine_run(fast, request, n)}
        for run in paths.values():
            run()  # warm-up
        runs = {key: [] for key in paths}
        for _ in range(args.repeats):
            for key, run in paths.items():  # round-robin
                runs[key].append(run())
        rate = {key: med([r.rate for r in values]) for key, values in runs.items()}
        ttft = {key: med([1000 * r.ttft for r in values]) for key, values in runs.items()}
        fast_rate, recipe_rate = rate["decode_path='fast'"], rate["recipe (model.generate)"]
        prompt_tokens = baseline.encode(request.segments, request.images).num_tokens
        floor, floor_text = floor_of(args.device, bytes_per_token(model, prompt_tokens, n), fast_rate)
        found, path = compiles.since(), path_of(fast)
        report.phase(name, dict(new_tokens=n, prompt_tokens=prompt_tokens, repeats=args.repeats,
                                rates={k: [r.rate for r in v] for k, v in runs.items()},
                                ttft_ms={k: [1000 * r.ttft for r in v] for k, v in runs.items()},
                                floor=floor, path=path, **found),
                     ["", f"| batch 1, {prompt_tokens} prompt tokens, {n} new tokens | decode tokens/s | "
                      f"time to first token ms | / recipe |", "|---|---:|---:|---:|"]
                     + [f"| {k} | {rate[k]:.1f} | {ttft[k]:.1f} | {rate[k] / recipe_rate:.2f}x |" for k in paths]
                     + ["", f"- decode_path='fast' {floor_text}.", f"- {compile_line(found, path)}"])

    name = f"{args.concurrent} concurrent"
    tokens = args.concurrent_tokens
    if report.fits(name, args.slack + 3 * (args.repeats + 1) * tokens / 25):
        prompts = concurrent_prompts(baseline, args.concurrent)
        rates = {1: [], args.concurrent: []}
        for round_ in range(args.repeats + 1):  # round 0: warm-up
            for count in rates:
                rate = concurrent_run(fast, prompts[:count], tokens)[0]
                if round_:
                    rates[count].append(rate)
        one, many = med(rates[1]), med(rates[args.concurrent])
        found, path = compiles.since(), path_of(fast)
        report.phase(name, dict(new_tokens=tokens, rates=rates, ratio=many / one, path=path, **found),
                     [f"- **{args.concurrent} concurrent requests** ({tokens} new tokens each, decode_path='fast'): "
                      f"{many:.1f} tokens/s in all against {one:.1f} for one stream: **{many / one:.2f}x**; "
                      f"{compile_line(found, path)}"])

    name = "mixed adapters"
    if report.fits(name, 2 * args.slack + 3 * (args.repeats + 1) * tokens / 25):
        mixed_adapters(args, report, compiles, model, fast, baseline, tokens)
    return True


def concurrent_prompts(engine, count: int, made: dict = {}) -> list:  # noqa: B006 (made once per process)
    """The concurrent requests (different questions and images), encoded: made once, used by two phases."""
    if engine not in made:
        made[engine] = [engine.encode(r.segments, r.images) for r in (make_request(engine, i) for i in range(count))]
    return made[engine]


def mixed_adapters(args, report: Report, compiles: Compiles, model, fast, baseline, tokens: int) -> None:
    """16 rows of one LoRA adapter against 16 rows of 4 different ones (random LoRAs like MedIDEFICS: r=16, alpha
    32, q/k/v), loaded as a server loads `lora_weights`; the first round (warm-up) is where PEFT's wrapping of the
    layers shows as recompilations."""
    from idefics_cog.serving.adapters import Adapters

    kinds = min(ADAPTERS, args.concurrent)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = [str(fast.run(random_lora, model, tmp / f"adapter{seed}", seed, std=0.02))
                   for seed in range(kinds + 1)]
        adapters = Adapters(fast, tmp / "cache", max_loaded=kinds + 1)
        prepared = time.perf_counter() - started
        prompts = concurrent_prompts(baseline, args.concurrent)
        mixes = {"one adapter": [folders[0]] * args.concurrent,
                 f"{kinds} adapters": [folders[1 + i % kinds] for i in range(args.concurrent)]}
        rates = {key: [] for key in mixes}
        first_round = None
        for round_ in range(args.repeats + 1):  # round 0: warm-up (loads the adapters, compiles what it must)
            began = time.perf_counter()
            for key, mix in mixes.items():
                jobs = [Job(p, Sampling(max_new_tokens=tokens, ignore_eos=True), adapter=("", source, 1.0),
                            select_adapter=lambda source=source: adapters.select("", source, 1.0, allow_local=True))
                        for p, source in zip(prompts, mix)]
                fast.scheduler.largest_batch = 0
                wall = stream_together(fast, jobs)
                if round_:
                    rates[key].append(sum(len(j.stats.ids) for j in jobs) / wall)
            if not round_:
                first_round = time.perf_counter() - began
    one, several = med(rates["one adapter"]), med(rates[f"{kinds} adapters"])
    found, path = compiles.since(), path_of(fast)
    report.phase("mixed adapters", dict(new_tokens=tokens, rates=rates, ratio=several / one,
                                        adapters_made_s=prepared, first_round_s=first_round,
                                        largest_batch=fast.scheduler.largest_batch, path=path, **found),
                 [f"- **mixed adapters** ({args.concurrent} rows, {tokens} new tokens each): {kinds} different "
                  f"adapters {several:.1f} tokens/s against one adapter {one:.1f}: **{several / one:.2f}x** (largest "
                  f"batch {fast.scheduler.largest_batch}; first round, loading the adapters: {first_round:.1f} s); "
                  f"{compile_line(found, path)}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check", "speed"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default="real", choices=["real", "tiny"])
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--deadline", type=float, help="Unix time by which the command must have ended")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrent-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=16, help="concurrent requests (and mixed-adapter rows)")
    parser.add_argument("--warm-up", default="auto", choices=["auto", "on", "off"],
                        help="auto: only if its estimated time leaves --reserve seconds for the measurements")
    parser.add_argument("--reserve", type=float, default=None, help="default: 150 s (real), 5 s (tiny)")
    args = parser.parse_args(argv)
    args.reserve = args.reserve if args.reserve is not None else 150.0 if args.size == "real" else 5.0
    args.slack = 30.0 if args.size == "real" else 3.0  # seconds a phase needs beside its tokens (compiling, loading)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    titles = {"check": "Greedy check: compiled fast path against model.generate (float32, real widths, few layers)",
              "speed": "Speed: random idefics-9b in bf16" if args.size == "real" else "Speed (tiny shape)"}
    report = Report(args.out, args.command, titles[args.command], args.deadline)
    try:
        ok = (check if args.command == "check" else speed)(args, report)
    except BaseException as exc:
        report.lines.append(f"- **failed**: {type(exc).__name__}: {str(exc)[:500]}")
        report.write("failed")
        raise
    finally:
        free_memory(torch.device(args.device))
    report.write("done" if ok else "done, CHECK FAILED")
    progress(f"{args.command}: {report.data['status']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
