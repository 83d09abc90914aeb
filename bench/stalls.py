"""Stalls and host work of the fast path's decode loop (issue 13, points 2 and 3).

Two measurements, each on the fast path (`Engine(decode_path="fast")`, 16 slots), in float32 on CPU:

  arrivals   4 running streams (one 224 px image, about 60 prompt tokens, --stream-tokens new tokens each,
             greedy, ignore_eos) while 8 requests with two images and a long prompt (about --long-tokens tokens,
             --arrival-tokens new tokens each) arrive in two bursts of 4 (when the first stream has made 30 and 80
             tokens; submitted from its sink, so the moment is the same on any machine). Reported: the gaps between
             consecutive tokens of the running streams (their first token excluded), median, 99th percentile and
             largest, and p99 / median (issue 13's target: under 3x); and the arrivals' time to first token
             from their submission. Preset: bench-small (--preset).
  burst      --burst-size requests (0, 1 or 2 images of 224 px, 20 to 90 prompt tokens, 2 new tokens each) reach
             the idle engine together (16 slots): time from their release to each one's first token (median, and
             max = the burst's last first token), with the burst's prompts packed into shared forwards
             (Scheduler BURST_TOKENS, FastDecoder.prefill_together) and, in the same session, one by one (the path
             before: BURST_TOKENS = 0 makes every forward one prompt), alternating. Preset: bench-small (--preset).
  host       host time per decode step: the wall time of `Scheduler._step` minus that of the model's forward
             (`FastDecoder.decode`), over the steps that decode exactly N rows, for N = 1 and 16 concurrent
             requests, all greedy or all sampled (temperature 0.7, top-p 0.9, top-k 50, repetition penalty 1.1,
             each with its own seed), --host-tokens new tokens each. Preset: tiny (--host-preset).

`--src DIR` imports `idefics_cog` from another source tree (e.g. an older commit's `src`, exported with
`git archive`), so that the code before a change can be measured with this same script in the same session:

    .venv/bin/python bench/stalls.py [--part burst] [--repeats 3] [--src /tmp/before/src] [--json PATH]
"""

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["arrivals", "burst", "host", "all"], default="all")
    parser.add_argument("--preset", default="bench-small", help="the model of `arrivals`")
    parser.add_argument("--host-preset", default="tiny", help="the model of `host`")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (samples are pooled)")
    parser.add_argument("--stream-tokens", type=int, default=128)
    parser.add_argument("--long-tokens", type=int, default=300, help="prompt tokens of each arriving request")
    parser.add_argument("--arrival-tokens", type=int, default=16)
    parser.add_argument("--burst-size", type=int, default=8, help="requests of `burst`")
    parser.add_argument("--host-tokens", type=int, default=96,
                        help="new tokens per request of `host` (enough for all 16 to be decoding together)")
    parser.add_argument("--prefill-chunk", type=int, help="the scheduler's prefill piece, in prompt tokens "
                        "(default: the engine's own; ignored by code without chunked prefill)")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the source tree to import idefics_cog from")
    parser.add_argument("--label", default="", help="a name for this run in the report (e.g. the commit)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    return parser.parse_args()


ARGS = parse_args()
sys.path[:0] = [str(ARGS.src), str(ROOT), str(ROOT / "src")]

import transformers  # noqa: E402

from bench.stats import machine  # noqa: E402
from idefics_cog.inputs.prompt import build_segments  # noqa: E402
from idefics_cog.serving.engine import Engine  # noqa: E402
from idefics_cog.serving.jobs import Job, Sampling  # noqa: E402
from idefics_dev import tiny  # noqa: E402
from tests.support.helpers import noise_image  # noqa: E402

IMAGE_PX = 224
SAMPLED = dict(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1)


def load(preset: str) -> Engine:
    base = tiny.build(ROOT / "weights" / preset, preset) / "base"
    engine = Engine.load(base, "cpu", decode_path="fast", max_batch=16)  # as the server: all torch work on its thread
    if ARGS.prefill_chunk and hasattr(engine.scheduler, "chunk_tokens"):
        engine.scheduler.chunk_tokens = ARGS.prefill_chunk
    return engine


def prompt(engine: Engine, index: int, images: int, tokens: int):
    """An encoded request with `images` noise images and a question grown to at least `tokens` prompt tokens."""
    rng = random.Random(index)
    pictures = [noise_image(100 * index + i, (IMAGE_PX, IMAGE_PX)) for i in range(images)]
    words = []
    while True:
        words.extend(rng.choice(tiny.WORDS) for _ in range(8))
        encoded = engine.encode(build_segments(" ".join(words).capitalize() + "?", images), pictures)
        if encoded.num_tokens >= tokens:
            return encoded


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def hold(engine: Engine) -> threading.Event:
    """Hold the engine's thread until the returned event is set (so that jobs submitted meanwhile arrive together)."""
    gate = threading.Event()
    engine.torch_thread.submit(gate.wait)
    return gate


# --- arrivals -------------------------------------------------------------------------------------------------------


def arrivals_run(engine: Engine, running: list, arriving: list) -> dict:
    times = [[] for _ in running]  # per running stream: when each of its token lists arrived
    submitted, first = {}, {}
    half = len(arriving) // 2
    bursts = {30: range(half), 80: range(half, len(arriving))}  # tokens of stream 0 -> the requests arriving then

    def arrival_sink(index):
        def sink(item):
            if isinstance(item, list) and index not in first:
                first[index] = time.perf_counter()
        return sink

    def running_sink(index):
        def sink(item):
            if isinstance(item, list):
                times[index].append(time.perf_counter())
                if index == 0 and len(times[0]) in bursts:
                    for at in bursts[len(times[0])]:
                        submitted[at] = time.perf_counter()
                        engine.submit(arrival_jobs[at], arrival_sink(at))
        return sink

    arrival_jobs = [Job(enc, Sampling(max_new_tokens=ARGS.arrival_tokens, ignore_eos=True)) for enc in arriving]
    jobs = [Job(enc, Sampling(max_new_tokens=ARGS.stream_tokens, ignore_eos=True)) for enc in running]
    gate = hold(engine)
    for index, job in enumerate(jobs):
        engine.submit(job, running_sink(index))
    gate.set()
    for job in jobs + arrival_jobs:
        assert job.finished.wait(120), "a request never ended"
    gaps = [1000 * (b - a) for stream in times for a, b in zip(stream[1:], stream[2:])]  # from the 2nd token on
    ttft = [1000 * (first[i] - submitted[i]) for i in first]
    return dict(gaps=gaps, ttft=ttft)


def timed(obj, name: str, into: dict) -> None:
    """Record the wall time (ms) of every call of obj.name in into[name] (when obj has it)."""
    function = getattr(obj, name, None)
    if function is None:
        return

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            into.setdefault(name, []).append(1000 * (time.perf_counter() - start))

    setattr(obj, name, wrapper)


def arrivals() -> dict:
    engine = load(ARGS.preset)
    calls = {}  # how long the decoder's prefills (whole, images, pieces) and decode steps took
    for name in ("prefill", "prefill_images", "prefill_chunk", "decode"):
        timed(engine.scheduler.decoder, name, calls)
    running = [prompt(engine, i, 1, 60) for i in range(4)]
    arriving = [prompt(engine, 10 + i, 2, ARGS.long_tokens) for i in range(8)]
    progress(f"arrivals: prompts of {[e.num_tokens for e in running]} and {[e.num_tokens for e in arriving]} tokens")
    arrivals_run(engine, running[:1], arriving[:1])  # warm-up
    calls.clear()
    gaps, ttft = [], []
    for _ in range(ARGS.repeats):
        result = arrivals_run(engine, running, arriving)
        gaps += result["gaps"]
        ttft += result["ttft"]
    engine.torch_thread.shutdown()
    median = statistics.median(gaps)
    return dict(gaps=gaps, ttft=ttft, median=median, p99=percentile(gaps, 99), largest=max(gaps),
                ratio=percentile(gaps, 99) / median, ttft_median=statistics.median(ttft), ttft_max=max(ttft),
                calls={name: statistics.median(ms) for name, ms in calls.items()},
                running_prompt=running[0].num_tokens, arriving_prompt=min(e.num_tokens for e in arriving))


# --- a burst at an idle server -------------------------------------------------------------------------------------


def burst_run(engine: Engine, prompts: list) -> list[float]:
    """Every prompt at once to the idle engine: ms from their release to each one's first token."""
    first = {}
    jobs = [Job(enc, Sampling(max_new_tokens=2, ignore_eos=True)) for enc in prompts]
    gate = hold(engine)
    for index, job in enumerate(jobs):
        engine.submit(job, lambda item, index=index: isinstance(item, list) and first.setdefault(
            index, time.perf_counter()))
    released = time.perf_counter()
    gate.set()
    for job in jobs:
        assert job.finished.wait(120), "a request never ended"
    return [1000 * (first[i] - released) for i in range(len(jobs))]


def burst() -> dict:
    from idefics_cog.serving import scheduler

    engine = load(ARGS.preset)
    prompts = [prompt(engine, 200 + i, i % 3, 20 + (i * 37) % 71) for i in range(ARGS.burst_size)]
    progress(f"burst: prompts of {[e.num_tokens for e in prompts]} tokens")
    packed = getattr(scheduler, "BURST_TOKENS", None)  # None: code before bursts were prefilled together
    modes = {"one by one": 0} | ({"together": packed} if packed is not None else {})
    results = {mode: [] for mode in modes}
    for repeat in range(ARGS.repeats + 1):  # the first round: warm-up
        for mode, tokens in modes.items():
            if packed is not None:
                scheduler.BURST_TOKENS = tokens
            ttft = burst_run(engine, prompts)
            if repeat:
                results[mode].append(dict(median=statistics.median(ttft), last=max(ttft)))
    if packed is not None:
        scheduler.BURST_TOKENS = packed
    engine.torch_thread.shutdown()
    return dict(size=len(prompts), tokens=sum(e.num_tokens for e in prompts),
                modes={mode: dict(median=statistics.median(r["median"] for r in runs),
                                  last=statistics.median(r["last"] for r in runs), runs=runs)
                       for mode, runs in results.items()})


# --- host time per step ---------------------------------------------------------------------------------------------


def host_run(engine: Engine, prompts: list, sampled: bool) -> list[tuple[int, float, float]]:
    """(rows, step seconds, forward seconds) of every decode step of one run of these prompts at once."""
    scheduler, decoder = engine.scheduler, engine.scheduler.decoder
    steps, forward = [], []
    step, decode = scheduler._step, decoder.decode

    def timed_decode(*args, **kwargs):
        start = time.perf_counter()
        try:
            return decode(*args, **kwargs)
        finally:
            forward.append(time.perf_counter() - start)

    def timed_step():
        rows, start, before = len(scheduler.rows), time.perf_counter(), len(forward)
        step()
        if len(forward) > before:  # a step that decoded
            steps.append((rows, time.perf_counter() - start, forward[-1]))

    scheduler._step, decoder.decode = timed_step, timed_decode
    try:
        settings = [Sampling(max_new_tokens=ARGS.host_tokens, ignore_eos=True, seed=i,
                             **(SAMPLED if sampled else {})) for i in range(len(prompts))]
        jobs = [Job(enc, s) for enc, s in zip(prompts, settings)]
        gate = hold(engine)
        for job in jobs:
            engine.submit(job, lambda item: None)
        gate.set()
        for job in jobs:
            assert job.finished.wait(600), "a request never ended"
    finally:
        del scheduler._step, decoder.decode
    return steps


def host() -> dict:
    engine = load(ARGS.host_preset)
    prompts = [prompt(engine, i, 1, 60) for i in range(16)]
    results = {}
    for sampled in (False, True):
        for n in (1, 16):
            host_run(engine, prompts[:n], sampled)  # warm-up
            full = [s for _ in range(ARGS.repeats) for s in host_run(engine, prompts[:n], sampled) if s[0] == n]
            name = f"batch {n}, {'sampled' if sampled else 'greedy'}"
            results[name] = dict(host=[1000 * (s - f) for _, s, f in full], forward=[1000 * f for _, _, f in full],
                                 step=[1000 * s for _, s, _ in full])
            progress(f"host: {name}: {len(full)} steps")
    engine.torch_thread.shutdown()
    return results


# --- the report -----------------------------------------------------------------------------------------------------

STARTED = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


def report(info: dict, arrive: dict | None, steps: dict | None, bursts: dict | None = None) -> str:
    lines = [f"# Decode-loop stalls and host work{' (' + ARGS.label + ')' if ARGS.label else ''}\n",
             f"{info['cpu']}, {info['cpus']} CPUs, {info['torch_threads']} torch threads; torch {info['torch']}, "
             f"transformers {info['transformers']}; float32 on CPU; idefics_cog from {ARGS.src}; "
             f"{ARGS.repeats} runs after a warm-up; prefill pieces of "
             f"{ARGS.prefill_chunk or 'the default'} tokens.\n"]
    if arrive:
        lines += [f"Arrivals ({ARGS.preset}): 4 running streams ({arrive['running_prompt']} prompt tokens, "
                  f"{ARGS.stream_tokens} new tokens) while 8 two-image requests (>= {arrive['arriving_prompt']} "
                  f"prompt tokens, {ARGS.arrival_tokens} new tokens) arrive in two bursts of 4.\n",
                  "| running streams' token gap | median ms | p99 ms | largest ms | p99 / median | "
                  "arrivals' first token median ms | max ms |", "|---|---:|---:|---:|---:|---:|---:|",
                  f"| {len(arrive['gaps'])} gaps | {arrive['median']:.1f} | {arrive['p99']:.1f} | "
                  f"{arrive['largest']:.1f} | {arrive['ratio']:.2f}x | {arrive['ttft_median']:.1f} | "
                  f"{arrive['ttft_max']:.1f} |\n",
                  "Median ms per call of the decoder: " + ", ".join(f"{name} {ms:.1f}" for name, ms in
                                                                    arrive["calls"].items()) + ".\n"]
    if bursts:
        lines += [f"A burst at an idle server ({ARGS.preset}): {bursts['size']} requests, {bursts['tokens']} prompt "
                  f"tokens in all, released together; ms from the release to the first token (medians over the "
                  f"runs).\n",
                  "| burst prefill | first token, median request ms | last first token ms |", "|---|---:|---:|"]
        lines += [f"| {mode} | {r['median']:.1f} | {r['last']:.1f} |" for mode, r in bursts["modes"].items()]
        lines.append("")
    if steps:
        lines += [f"Host time per decode step ({ARGS.host_preset}, {ARGS.host_tokens} new tokens per request): "
                  f"the step's wall time minus the model's forward.\n",
                  "| decode steps | steps | host ms (median) | forward ms (median) | step ms (median) |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {len(r['host'])} | {statistics.median(r['host']):.3f} | "
                  f"{statistics.median(r['forward']):.3f} | {statistics.median(r['step']):.3f} |"
                  for name, r in steps.items()]
    return "\n".join(lines)


def main() -> None:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import idefics_cog
    progress(f"idefics_cog from {Path(idefics_cog.__file__).parent}")
    arrive = arrivals() if ARGS.part in ("arrivals", "all") else None
    bursts = burst() if ARGS.part in ("burst", "all") else None
    steps = host() if ARGS.part in ("host", "all") else None
    info = machine()
    print(report(info, arrive, steps, bursts))
    if ARGS.json:
        ARGS.json.parent.mkdir(parents=True, exist_ok=True)
        ARGS.json.write_text(json.dumps(dict(info=info, args={k: str(v) for k, v in vars(ARGS).items()},
                                             arrivals=arrive, burst=bursts, host=steps), indent=2) + "\n")


if __name__ == "__main__":
    main()
