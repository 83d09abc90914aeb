"""Decode speed: the fast path against the model-card recipe and the plain transformers path (issue 6).

Three paths serve the same requests (instruct template, one 224 px image, about 60 prompt tokens, greedy):

  recipe        idefics_dev.recipe.model_card_generate: processor -> model.generate -> decode (the baseline)
  transformers  Engine(decode_path="transformers"): the project's engine on model.generate, one request at a time
  fast          Engine(decode_path="fast"): static KV cache, image keys/values computed once, concurrent requests
                decoded as one batch (torch.compile on CUDA)

Every path encodes with the processor from idefics_cog.model.tokenizer.load_processor: the release-era tokens
(transformers 4.32's), the recipe's `processor(text=...)` included.

First, in float32, the fast path's greedy tokens must equal model.generate's on the benchmark prompt: the recipe's
(stopping at the end of the turn) and the transformers path's over all new tokens with ignore_eos; if not, the
script exits 1. Then, after a warm-up run of each path, the paths run round-robin; every figure is a median:

  time to first token  request (PIL image + text) -> first new token: encoding, prefill, first sample
  prefill              one forward over the encoded prompt: the model's (what generate does first), the fast path's
  decode tokens/s      batch 1, --new-tokens new tokens with ignore_eos: (tokens - 1) / (last - first token time)
  peak memory          growth during a request: CUDA max_memory_allocated; CPU peak resident set (VmHWM, reset
                       through /proc/self/clear_refs)
  aggregate tokens/s   1, 4 and 16 concurrent requests (read by one event loop, as Cog's async predictor reads
                       them; different prompts and images), --concurrent-tokens new tokens each: all new tokens /
                       wall time (rounds: half of --repeats, rounded up; each round runs 1, 4 and 16 in turn)

    .venv/bin/python bench/speed.py [--preset bench-small|tiny] [--repeats 5] [--json PATH]
    python bench/speed.py --real-size --repeats 3   # a random idefics-9b in bf16; needs CUDA
    .venv/bin/python bench/speed.py --real-size --smoke   # that code path scaled down, on CPU

The presets run on CPU in float32 (`bench-small` is sized so that a plain generate step costs a few ms, with real
matrix work in it); about 3 minutes on 2 cores. `--real-size` builds a random idefics-9b on the GPU with the tiny
tokenizer (ids < 451) on the real 32000 + 2 vocabulary. Its greedy check runs in float32 (in bf16, kernels that
round differently flip the many near-ties of random weights) at the real widths with 4 decoder layers (one gated
cross-attention block) and 2 vision layers: the 9b is never built in float32 (about 40 GB). The timing runs on
the whole 9b, built in bf16 on the GPU, with 16 cache slots. It also reports the fraction of the memory-bandwidth
floor: decoding a token cannot take less than reading, once, the weights it needs. Progress goes to stderr, the
report (Markdown) to stdout. (bench/gpu.sh, with bench/gpu_bench.py, is the GPU loan's script: these measurements
and more, in phases that fit a time limit.)
"""

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import torch  # noqa: E402
import transformers  # noqa: E402

from bench.stats import machine, median_table, rate_table  # noqa: E402
from idefics_dev import tiny  # noqa: E402
from idefics_cog.serving.jobs import NewTokens  # noqa: E402
from idefics_cog.serving.engine import Engine, TorchThread  # noqa: E402
from idefics_cog.serving.jobs import Job, Sampling  # noqa: E402
from idefics_cog.inputs.prompt import build_segments  # noqa: E402
from idefics_dev.recipe import model_card_generate  # noqa: E402
from tests.support.helpers import noise_image  # noqa: E402

PROMPT_TOKENS = 60
IMAGE_PX = 224
CONCURRENCY = (1, 4, 16)
GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
# Datasheet memory bandwidth, bytes/s, by GPU name (H100: the SXM/HBM3 part).
BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "A100": 2.04e12}
MiB = 2**20
CHECK_LAYERS = 4  # decoder layers of the real-width float32 check model: one gated cross-attention block
# All torch work of the benchmark on one thread, as in the server (engine.TorchThread: a second thread's OpenMP
# team slows every operation of the first on a small CPU); the engines share it and run one at a time.
TORCH = TorchThread()


def new_engine(model, processor, **options) -> Engine:
    return Engine(model, processor, model.device, torch_thread=TORCH, **options)


# --- the requests ---------------------------------------------------------------------------------------------------


@dataclass
class Request:
    segments: list
    images: list

    @property
    def items(self) -> list:
        """The interleaved list the processor (the recipe) takes."""
        return [self.images[s] if isinstance(s, int) else s for s in self.segments]


def make_request(engine: Engine, index: int) -> Request:
    """A different question and 224 px image per index; the question grows until the prompt has PROMPT_TOKENS."""
    rng, images, words = random.Random(index), [noise_image(index, (IMAGE_PX, IMAGE_PX))], []
    while True:
        words.append(rng.choice(tiny.WORDS))
        segments = build_segments(" ".join(words).capitalize() + "?", 1)
        if engine.encode(segments, images).num_tokens >= PROMPT_TOKENS:
            return Request(segments, images)


# --- measuring ------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024


class PeakMemory:
    """Peak memory growth over a `with` block: allocated CUDA memory, or on CPU the peak resident set (Linux)."""

    def __init__(self, device: torch.device):
        self.cuda, self.bytes = device.type == "cuda", 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.before = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.before
        else:
            self.bytes = max(0, _proc_status_bytes("VmHWM") - self.before)


@dataclass
class Run:
    ttft: float  # seconds from the request to its first new token
    rate: float  # decode tokens/s after the first token
    peak: int  # bytes of memory growth
    ids: list[int]


def decode_rate(tokens: int, first: float, last: float) -> float:
    return (tokens - 1) / (last - first) if tokens > 1 else float("nan")


def recipe_run(engine: Engine, request: Request, new_tokens: int, ignore_eos: bool = True) -> Run:
    """model_card_generate, on the (transformers) engine's torch thread: torch on two threads of one process makes
    two OpenMP teams that spin against each other on a small CPU (see BENCHMARKS.md, issue 2)."""
    times: list[float] = []  # when `generate` hands over each new token
    clock = NewTokens(lambda ids: times.append(time.perf_counter()))
    forced = dict(min_new_tokens=new_tokens) if ignore_eos else {}  # the recipe's way to go past the end of turn
    with PeakMemory(engine.device) as peak:
        start = time.perf_counter()
        _, ids = engine.torch_thread.submit(
            model_card_generate, engine.model, engine.processor, request.items, new_tokens, streamer=clock,
            **GREEDY, **forced).result()
    return Run(times[0] - start, decode_rate(len(ids), times[0], times[-1]), peak.bytes, ids)


def engine_run(engine: Engine, request: Request, new_tokens: int, ignore_eos: bool = True) -> Run:
    with PeakMemory(engine.device) as peak:
        start = time.perf_counter()
        job = Job(encoded=engine.encode(request.segments, request.images),
                  sampling=Sampling(max_new_tokens=new_tokens, ignore_eos=ignore_eos))
        for _ in engine.stream(job):
            pass
    stats = job.stats
    return Run(stats.first_token_at - start, decode_rate(len(stats.ids), stats.first_token_at, stats.ended),
               peak.bytes, stats.ids)


def stream_together(engine: Engine, jobs: list[Job]) -> float:
    """Stream every job at once, as the server does (Cog's async predictor: one event loop reads every stream,
    `Engine.astream`); returns the wall time from the first submit to the last token."""
    async def read(job: Job) -> None:
        async for _ in engine.astream(job):
            pass

    async def read_all() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(read(job) for job in jobs))
        return time.perf_counter() - start

    return asyncio.run(read_all())


def concurrent_run(engine: Engine, prompts: list, new_tokens: int) -> tuple[float, int, list[list[int]]]:
    """Every prompt at once: aggregate new tokens/s, peak memory growth, each request's tokens."""
    jobs = [Job(encoded=p, sampling=Sampling(max_new_tokens=new_tokens, ignore_eos=True)) for p in prompts]
    with PeakMemory(engine.device) as peak:
        wall = stream_together(engine, jobs)
    return sum(len(job.stats.ids) for job in jobs) / wall, peak.bytes, [job.stats.ids for job in jobs]


def prefill_seconds(engine: Engine, encoded) -> float:
    """One forward over the prompt, as the engine's path does it, timed on its torch thread."""
    decoder = getattr(engine.scheduler, "decoder", None)  # the fast path's FastDecoder, None on transformers

    def run():
        start = time.perf_counter()
        with torch.inference_mode():
            if decoder is not None:
                decoder.prefill(engine.model, 0, encoded)  # slot 0: no request is active between runs
            else:
                engine.model(**encoded.to(engine.device, engine.dtype), use_cache=True)
        synchronize(engine.device)
        return time.perf_counter() - start

    return engine.torch_thread.submit(run).result()


# --- the greedy check -----------------------------------------------------------------------------------------------


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_greedy(model, processor, new_tokens: int) -> int:
    """Exit 1 unless the fast path decodes model.generate's greedy tokens. Returns how many were compared."""
    baseline = new_engine(model, processor, decode_path="transformers")
    fast = new_engine(model, processor, decode_path="fast", max_batch=1)
    if fast.decode_path != "fast":
        sys.exit(f"decode_path='fast' gave {fast.decode_path!r}: nothing to benchmark")
    request = make_request(baseline, 0)
    compared = 0
    for reference, expected, ignore_eos in (
        ("model_card_generate (stops at the end of turn)", recipe_run(baseline, request, new_tokens, False).ids, False),
        ("model.generate (decode_path='transformers', ignore_eos)", engine_run(baseline, request, new_tokens).ids,
         True),
    ):
        got = engine_run(fast, request, new_tokens, ignore_eos).ids
        if got != expected:
            at = first_difference(got, expected)
            sys.exit(f"greedy check failed: the fast path differs from {reference} at new token {at} of "
                     f"{len(expected)}:\n  fast     {got[at:at + 8]}\n  expected {expected[at:at + 8]}")
        compared += len(got)
    del baseline, fast  # free the check's caches before the timed engines are made
    free_memory(model.device)
    return compared


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the models -----------------------------------------------------------------------------------------------------


def preset_model(preset: str):
    from transformers import IdeficsForVisionText2Text

    from idefics_cog.model.tokenizer import load_processor

    base = tiny.build(ROOT / "weights" / preset, preset) / "base"
    model = IdeficsForVisionText2Text.from_pretrained(base, dtype=torch.float32, device_map={"": "cpu"}).eval()
    return model, load_processor(base), f"`{preset}` random IDEFICS"


def real_size_model(smoke: bool, dtype=torch.float32, device: str | None = None, layers: int | None = None,
                    processor=None):
    """A random idefics-9b in `dtype`, made on `device` (CUDA; the CPU for `smoke`), and the tiny processor.
    `layers`: that many decoder layers (a multiple of the cross-attention interval, 4) and 2 vision layers, at the
    real widths: what a float32 check needs, without building the 9b in float32 (about 40 GB)."""
    device = device or ("cpu" if smoke else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--real-size needs a CUDA GPU (or add --smoke for a scaled-down run on CPU)")
    config = tiny.idefics_9b_config(smoke)
    what = "scaled-down idefics-9b shape (smoke)" if smoke else "random idefics-9b"
    if layers:
        config.num_hidden_layers = layers
        config.vision_config.num_hidden_layers = min(2, config.vision_config.num_hidden_layers)
        what += f" with {layers} decoder layers and 2 vision layers"
    model = tiny.random_model(config, device, dtype)
    return model, processor or tiny.build_processor(config.vision_config.image_size), what


def decode_bytes(model) -> int:
    """Weight bytes read to decode one token: text layers, gated cross-attention blocks (less their image
    key/value projections, computed once per image), final norm and output layer. The embedding is a lookup;
    the vision tower and perceiver run once per image."""
    def size(modules) -> int:
        return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())

    inner = model.model
    cached = [proj for block in inner.gated_cross_attn_layers for proj in (block.cross_attn.k_proj,
                                                                             block.cross_attn.v_proj)]
    return size([inner.layers, inner.gated_cross_attn_layers, inner.norm, model.lm_head]) - size(cached)


def bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in BANDWIDTH.items() if key in name), None)


# --- the benchmark --------------------------------------------------------------------------------------------------


def single_stream(paths: dict, request: Request, new_tokens: int, repeats: int) -> dict[str, list[Run]]:
    for run in paths.values():
        run(request, new_tokens)  # warm-up
    runs: dict[str, list[Run]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():  # round-robin, so that a slow moment of the machine hits every path
            runs[name].append(run(request, new_tokens))
    return runs


def concurrency(engines: dict, prompts: list, new_tokens: int, repeats: int, strict: bool) -> dict:
    """Aggregate tokens/s and peak memory growth per (engine, concurrent requests), each round running every
    engine at every count in turn (so that a slow minute of the machine hits them all, and the ratios compare runs
    made close together). The first round also checks that both engines decode each request to the same tokens:
    required in float32, reported in bf16."""
    rates = {(name, n): [] for name in engines for n in CONCURRENCY}
    peaks = {(name, n): [] for name in engines for n in CONCURRENCY}
    agree = {}
    for n in CONCURRENCY:
        concurrent_run(engines["fast"], prompts[:n], new_tokens)  # warm-up (on CUDA: compiles the batch sizes)
    for round_ in range(repeats):
        for n in CONCURRENCY:
            tokens = {}
            for name, engine in engines.items():
                rate, peak, tokens[name] = concurrent_run(engine, prompts[:n], new_tokens)
                rates[name, n].append(rate)
                peaks[name, n].append(peak)
            if round_ == 0:
                agree[n] = sum(a == b for a, b in zip(tokens["transformers"], tokens["fast"]))
                if strict and agree[n] != n:
                    sys.exit(f"batched check failed: at {n} concurrent requests, {n - agree[n]} of them got other "
                             f"tokens from the fast path than from model.generate")
    return dict(rates=rates, peaks=peaks, agree=agree)


# --- the report -----------------------------------------------------------------------------------------------------

NAMES = {"recipe": "recipe (model_card_generate)", "transformers": "decode_path='transformers'",
         "fast": "decode_path='fast'"}
FORWARD = "model forward (recipe, transformers)"


def median(values) -> float:
    return statistics.median(values)


def single_tables(single: dict, prefill: dict, new_tokens: int) -> list[str]:
    ttft = {NAMES[k]: [1000 * r.ttft for r in runs] for k, runs in single.items()}
    prefill_ms = {FORWARD: [1000 * s for s in prefill["transformers"]],
                  "FastDecoder.prefill (fast)": [1000 * s for s in prefill["fast"]]}
    rates = {NAMES[k]: [r.rate for r in runs] for k, runs in single.items()}
    return [median_table("time to first token", ttft, NAMES["recipe"]),
            median_table("prefill (one forward over the prompt)", prefill_ms, FORWARD),
            rate_table(f"decode, batch 1, {new_tokens} new tokens", rates, NAMES["recipe"])]


def concurrency_table(conc: dict, new_tokens: int) -> str:
    rates, single = conc["rates"], median(conc["rates"]["fast", 1])
    lines = [f"| concurrent requests, {new_tokens} new tokens each | decode_path='transformers' tokens/s | "
             f"decode_path='fast' tokens/s | fast / transformers | fast / fast at 1 | same tokens |",
             "|---|---:|---:|---:|---:|---:|"]
    for n in CONCURRENCY:
        base, fast = median(rates["transformers", n]), median(rates["fast", n])
        lines.append(f"| {n} | {base:.1f} | {fast:.1f} | {fast / base:.2f}x | {fast / single:.2f}x | "
                     f"{conc['agree'][n]}/{n} |")
    return "\n".join(lines)


def memory_table(single: dict, conc: dict, engines: dict) -> str:
    mib = lambda values: f"{median(values) / MiB:.1f}"  # noqa: E731
    lines = ["| peak memory growth, MiB (median) | recipe | decode_path='transformers' | decode_path='fast' |",
             "|---|---:|---:|---:|",
             f"| making the engine (its static caches) | - | {mib([engines['transformers']])} | "
             f"{mib([engines['fast']])} |",
             "| one request, batch 1 | " + " | ".join(mib([r.peak for r in single[k]]) for k in NAMES) + " |"]
    for n in CONCURRENCY[1:]:
        lines.append(f"| {n} concurrent requests | - | {mib(conc['peaks']['transformers', n])} | "
                     f"{mib(conc['peaks']['fast', n])} |")
    return "\n".join(lines)


def targets(real_size: bool, single: dict, conc: dict) -> list[tuple[str, str, bool]]:
    fast, recipe = (median([r.rate for r in single[k]]) for k in ("fast", "recipe"))
    if real_size:
        ttft = median([1000 * r.ttft for r in single["fast"]])
        return [("decode >= 150 tokens/s", f"{fast:.1f} tokens/s", fast >= 150),
                ("decode >= 4x the recipe", f"{fast / recipe:.2f}x", fast >= 4 * recipe),
                ("time to first token < 60 ms", f"{ttft:.1f} ms", ttft < 60)]
    aggregate, one = median(conc["rates"]["fast", CONCURRENCY[-1]]), median(conc["rates"]["fast", 1])
    return [("decode >= 2x the recipe (model.generate)", f"{fast / recipe:.2f}x", fast >= 2 * recipe),
            (f"aggregate at {CONCURRENCY[-1]} concurrent >= 6x a single stream", f"{aggregate / one:.2f}x",
             aggregate >= 6 * one)]


def targets_table(rows: list[tuple[str, str, bool]]) -> str:
    return "\n".join(["| target | measured | met |", "|---|---:|---|"]
                     + [f"| {name} | {value} | {'yes' if met else 'NO'} |" for name, value, met in rows])


def floor_line(info: dict, single: dict) -> str:
    """The memory-bandwidth floor of decoding: the time to read the weights one token needs, once."""
    fast = median([r.rate for r in single["fast"]])
    line = f"Memory-bandwidth floor: {info['decode_bytes'] / 1e9:.2f} GB of weights read per decoded token"
    if not info["bandwidth"]:
        return line + " (no datasheet bandwidth for this device)."
    floor = info["bandwidth"] / info["decode_bytes"]
    return line + (f"; at {info['bandwidth'] / 1e12:.2f} TB/s that is at most {floor:.0f} tokens/s, and "
                   f"decode_path='fast' decodes at {fast / floor:.0%} of it.")


def header(args, info: dict, compared: int) -> str:
    smoke = "  \n(smoke: the real-size code path scaled down on CPU; its figures are not the targets' subject)" \
        if args.real_size and args.smoke else ""
    return (f"# Decode speed: decode_path='fast' against model.generate\n\n"
            f"{info['model']}, {info['parameters'] / 1e6:.1f} M parameters in {info['dtype']} on {info['device']} "
            f"({info['cpu']}, {info['cpus']} CPUs, {info['torch_threads']} torch threads); torch {info['torch']}, "
            f"transformers {info['transformers']}, Python {info['python']}.{smoke}  \n"
            f"Requests: instruct template, one {IMAGE_PX} px image (the vision tower's input: "
            f"{info['image_size']} px), {info['prompt_tokens']} prompt tokens, greedy. Single stream: "
            f"{args.new_tokens} new tokens (ignore_eos), {args.repeats} runs per path after a warm-up, round-robin. "
            f"Concurrent: {args.concurrent_tokens} new tokens per request, {concurrent_repeats(args)} runs after a "
            f"warm-up.  \n"
            f"Greedy check (float32, before timing): the fast path's tokens equal model_card_generate's and "
            f"model.generate's ({compared} tokens compared).\n")


STARTED = time.perf_counter()


def progress(message: str) -> None:
    """On stderr, so that a long run on a GPU shows where it is (stdout is the report)."""
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


def concurrent_repeats(args) -> int:
    """Fewer rounds than single-stream: 16 requests one after another on decode_path='transformers' take long."""
    return (args.repeats + 1) // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench-small", choices=sorted(tiny.PRESETS))
    parser.add_argument("--real-size", action="store_true", help="a random idefics-9b in bf16 on CUDA")
    parser.add_argument("--smoke", action="store_true", help="with --real-size: scaled down, on CPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed single-stream runs per path (default 5)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--concurrent-tokens", type=int, default=128, help="new tokens per concurrent request")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    if args.real_size:
        # The greedy check in float32 at the real widths with few layers; the timing on the whole model, built in
        # bf16 on CUDA (the 9b is never built in float32). With --smoke both are the whole scaled-down model.
        model, processor, what = TORCH.run(real_size_model, args.smoke, layers=None if args.smoke else CHECK_LAYERS)
    else:
        model, processor, what = TORCH.run(preset_model, args.preset)
    progress(f"{what} ready")
    compared = check_greedy(model, processor, args.new_tokens)  # in float32, before anything is timed
    progress(f"greedy check passed ({compared} tokens)")
    if args.real_size and not args.smoke:
        # The check's compiled graphs captured its model's weights: drop both before the timed model is built.
        del model
        torch.compiler.reset()
        free_memory(torch.device("cuda"))
        model, processor, what = TORCH.run(real_size_model, False, torch.bfloat16, processor=processor)
        progress(f"{what} ready")
    device = model.device
    engines, engine_memory = {}, {}
    for kind in ("transformers", "fast"):
        with PeakMemory(device) as peak:
            engines[kind] = new_engine(model, processor, decode_path=kind, max_batch=max(CONCURRENCY))
        engine_memory[kind] = peak.bytes
    baseline, fast = engines["transformers"], engines["fast"]

    request = make_request(baseline, 0)
    paths = {"recipe": lambda r, n: recipe_run(baseline, r, n),
             "transformers": lambda r, n: engine_run(baseline, r, n),
             "fast": lambda r, n: engine_run(fast, r, n)}
    single = single_stream(paths, request, args.new_tokens, args.repeats)
    progress("single stream measured")
    encoded = baseline.encode(request.segments, request.images)
    prefill = {kind: [prefill_seconds(engine, encoded) for _ in range(args.repeats + 1)][1:]  # first: warm-up
               for kind, engine in engines.items()}
    prompts = [baseline.encode(r.segments, r.images)
               for r in (make_request(baseline, i) for i in range(max(CONCURRENCY)))]
    conc = concurrency(engines, prompts, args.concurrent_tokens, concurrent_repeats(args),
                       strict=model.dtype == torch.float32)
    progress("concurrent requests measured")

    info = machine() | dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", model=what,
        parameters=sum(p.numel() for p in model.parameters()), dtype=str(model.dtype).removeprefix("torch."),
        decode_bytes=decode_bytes(model), bandwidth=bandwidth(device), prompt_tokens=encoded.num_tokens,
        image_size=model.config.vision_config.image_size)
    tables = [*single_tables(single, prefill, args.new_tokens), concurrency_table(conc, args.concurrent_tokens),
              memory_table(single, conc, engine_memory)]
    if args.real_size:
        tables.append(floor_line(info, single))
    tables.append(targets_table(targets(args.real_size, single, conc)))
    print(header(args, info, compared))
    print("\n\n".join(tables))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            info=info, args={k: str(v) for k, v in vars(args).items()},
            single={k: [dict(ttft=r.ttft, rate=r.rate, peak=r.peak) for r in runs] for k, runs in single.items()},
            prefill=prefill, engine_memory=engine_memory,
            concurrency={f"{name} {n}": rates for (name, n), rates in conc["rates"].items()},
        ), indent=2) + "\n")


if __name__ == "__main__":
    main()
