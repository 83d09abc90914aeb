"""What the real Cog server (coglet) costs per request, and its 409 right after a response (issue 20, point 7).

Part 1, coglet alone: a trivial async predictor (no model; `run` returns a plain generator of `chunks` strings,
as predict.py returns its stream) served from a temporary directory, so the repository's schema is untouched:

  slot release   COG_MAX_CONCURRENCY=1: each request sent the moment the previous response arrived; how many are
                 answered 409 (coglet answers before it has taken the finished prediction's slot back)
  burst          COG_MAX_CONCURRENCY=16: one request, then 16 at once the moment it answered; 409s among the 16
  per request    wall time of 1 empty prediction, and of 16 at once (per request: wall / 16)
  per chunk      the same 16 with --chunks chunks each: (wall - empty wall) / (16 x chunks)

Part 2, the model (--preset, default bench-small; skipped with --no-model): 1 and 16 concurrent greedy requests
(different 224 px images and questions, --new-tokens each) through the server (HTTP, data URIs), through
predict.py's Predictor in-process (the same code minus coglet: an event loop on its own thread awaits `run`,
one thread per request reads the returned generator, as coglet does), and as bench/speed.py does (the prompts
encoded beforehand, submitted to the same engine at the same instant, ignore_eos). The first two must give the
same texts; their tokens are the server's output_token_count. Rounds alternate the paths; figures are medians.

    make tiny
    .venv/bin/python bench/server_overhead.py [--rounds 5] [--chunks 128] [--new-tokens 128] [--no-model]

The 409s are not retried here (they are what is counted); in part 2 they are retried (post_prediction) and
counted. Progress goes to stderr, the report (Markdown) to stdout.
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import requests  # noqa: E402

from bench.stats import machine  # noqa: E402
from idefics_dev.cogrunner import CogServer, post_prediction  # noqa: E402

TRIVIAL = '''from cog import BaseRunner, ConcatenateIterator, Input


class Predictor(BaseRunner):
    def setup(self) -> None:
        pass

    async def run(self, chunks: int = Input(default=0, ge=0, le=100000)) -> ConcatenateIterator[str]:
        return ("x" for _ in range(chunks))
'''
STARTED = time.perf_counter()
PATHS = {"server": "server", "in-process": "in-process Predictor", "engine": "engine, prompts encoded beforehand"}


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


def median(values) -> float:
    return statistics.median(values)


def trivial_server(directory: Path, concurrency: int) -> CogServer:
    (directory / "trivial_predict.py").write_text(TRIVIAL)
    env = {"COG_PREDICT_TYPE_STUB": "trivial_predict.py:Predictor", "COG_MAX_CONCURRENCY": str(concurrency)}
    return CogServer(env=env, root=directory, log_path=directory / f"server-{concurrency}.log")


def at_once(count: int, call) -> tuple[float, list]:
    """`call(i)` on `count` threads released together; (wall seconds from the release to the last answer, results)."""
    barrier, results, ends = threading.Barrier(count + 1), [None] * count, [0.0] * count

    def run(i):
        barrier.wait()
        results[i] = call(i)
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return max(ends) - start, results


def part_coglet(args) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="coglet-overhead-") as tmp:
        with trivial_server(Path(tmp), 1) as server:
            url, session, refused = f"{server.url}/predictions", requests.Session(), 0
            for _ in range(args.release_rounds):
                response = session.post(url, json={"input": {}})
                refused += response.status_code == 409
                if response.status_code == 409:  # wait for the slot, then go on with the next pair
                    post_prediction(url, {"input": {}}, session=session)
            out["release"] = (refused, args.release_rounds)
        progress("slot release measured")
        with trivial_server(Path(tmp), 16) as server:
            url = f"{server.url}/predictions"
            refused, single, burst, chunked = 0, [], [], []
            for _ in range(args.burst_rounds):
                post_prediction(url, {"input": {}})
                _, codes = at_once(16, lambda i: requests.post(url, json={"input": {}}).status_code)
                refused += codes.count(409)
            out["burst"] = (refused, args.burst_rounds)
            for _ in range(args.rounds * 4):
                time.sleep(0.05)  # every slot back
                start = time.perf_counter()
                post_prediction(url, {"input": {}})
                single.append(time.perf_counter() - start)
                time.sleep(0.05)
                wall, _ = at_once(16, lambda i: post_prediction(url, {"input": {}}))
                burst.append(wall)
                time.sleep(0.05)
                wall, answers = at_once(16, lambda i: post_prediction(url, {"input": {"chunks": args.chunks}}))
                assert all(len(a.json()["output"]) == args.chunks for a in answers)
                chunked.append(wall)
            out["single_ms"] = 1000 * median(single)
            out["burst_ms"] = 1000 * median(burst)
            out["chunk_us"] = 1e6 * (median(chunked) - median(burst)) / (16 * args.chunks)
        progress("coglet overhead measured")
    return out


# --- part 2: the model --------------------------------------------------------------------------------------------


def model_requests(count: int, new_tokens: int) -> list[dict]:
    from tests.support.helpers import data_uri, noise_image

    words = "what does this image show where is the lesion which side looks larger describe the texture".split()
    return [dict(prompt=" ".join(words[i % 5:i % 5 + 6]).capitalize() + "?",
                 image=data_uri(noise_image(i, (224, 224))), max_new_tokens=new_tokens, temperature=0.0,
                 adapter="none") for i in range(count)]


def part_model(args) -> dict:
    import cog

    from idefics_dev.schema import run_defaults
    from predict import Predictor

    base = ROOT / "weights" / args.preset / "base"
    if not (base.parent / "COMPLETE").exists():
        from idefics_dev import tiny
        tiny.build(base.parent, args.preset)
    env = {"IDEFICS_BASE_WEIGHTS": str(base), "IDEFICS_ADAPTER_WEIGHTS": "none"}
    os.environ.update(env)
    predictor = Predictor()
    predictor.setup()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    defaults = {**run_defaults(Predictor), "seed": 0}
    reqs = model_requests(16, args.new_tokens)

    def local(i):
        image = cog.Path.validate(reqs[i]["image"]).convert()  # a file as coglet hands it over, once per request
        pieces = asyncio.run_coroutine_threadsafe(
            predictor.run(**(defaults | reqs[i] | {"image": image})), loop).result()
        return "".join(pieces)

    engine = predictor.service.engine
    from idefics_cog.inputs.prompt import build_segments
    from idefics_cog.serving.jobs import Job, Sampling
    from tests.support.helpers import noise_image

    prompts = [engine.encode(build_segments(r["prompt"], 1), [noise_image(i, (224, 224))]) for i, r in enumerate(reqs)]

    def engine_burst(n: int) -> float:
        """bench/speed.py's way: n prompts already encoded, submitted at the same instant, read by one event loop."""
        jobs = [Job(encoded=p, sampling=Sampling(max_new_tokens=args.new_tokens, ignore_eos=True)) for p in prompts[:n]]

        async def read(job):
            async for _ in engine.astream(job):
                pass

        async def read_all():
            start = time.perf_counter()
            await asyncio.gather(*(read(job) for job in jobs))
            return time.perf_counter() - start

        wall = asyncio.run(read_all())
        return sum(len(job.stats.ids) for job in jobs) / wall

    rates = {(path, n): [] for path in PATHS for n in (1, 16)}
    refused = [0]
    with CogServer(env=env) as server:
        url = f"{server.url}/predictions"

        def remote(i):
            response = post_prediction(url, {"input": reqs[i]}, timeout=600,
                                       before_retry=lambda _: refused.__setitem__(0, refused[0] + 1))
            body = response.json()
            assert response.status_code == 200 and body["status"] == "succeeded", body
            return "".join(body["output"]), body["metrics"]["output_token_count"]

        _, answers = at_once(16, remote)  # warm-up, and the reference texts and token counts
        texts, tokens = [a[0] for a in answers], [a[1] for a in answers]
        _, local_texts = at_once(16, local)
        assert local_texts == texts, "the in-process Predictor answered other texts than the server"
        for round_ in range(args.rounds):
            for n in (1, 16):
                for path, call in (("server", remote), ("in-process", local)):
                    time.sleep(0.2)  # the server's slots back, the previous burst's threads gone
                    wall, _ = at_once(n, call)
                    rates[path, n].append(sum(tokens[:n]) / wall)
                time.sleep(0.2)
                rates["engine", n].append(engine_burst(n))
            progress(f"model round {round_ + 1}/{args.rounds}")
    return dict(rates=rates, tokens=tokens, refused=refused[0])


def report(args, coglet: dict, model: dict | None) -> str:
    info = machine()
    lines = [f"# What the Cog server costs per request\n\n{info['cpu']}, {info['cpus']} CPUs; torch {info['torch']}, "
             f"Python {info['python']}. Medians of {args.rounds * 4} runs (coglet alone) and {args.rounds} rounds "
             f"(the model).\n",
             "| coglet alone (trivial predictor) | measured |", "|---|---:|",
             f"| a request sent the moment the previous answered, 1 slot: 409s | {coglet['release'][0]} of "
             f"{coglet['release'][1]} |",
             f"| 16 at once the moment a single request answered, 16 slots: 409s | {coglet['burst'][0]} of "
             f"{16 * coglet['burst'][1]} ({coglet['burst'][1]} bursts) |",
             f"| one empty prediction, HTTP round trip | {coglet['single_ms']:.1f} ms |",
             f"| 16 empty predictions at once, wall / 16 | {coglet['burst_ms'] / 16:.1f} ms |",
             f"| each streamed chunk (16 x {args.chunks} chunks at once) | {coglet['chunk_us']:.0f} us |"]
    if model:
        rates = model["rates"]
        lines += ["", f"| {args.preset}, {args.new_tokens} new tokens (greedy) | " + " | ".join(
                  f"{PATHS[path]} tokens/s" for path in PATHS) + " |", "|---|---:|---:|---:|"]
        for n in (1, 16):
            lines.append(f"| {n} concurrent | " + " | ".join(f"{median(rates[path, n]):.1f}" for path in PATHS) + " |")
        ratio = {path: median(rates[path, 16]) / median(rates[path, 1]) for path in PATHS}
        lines.append("| 16 / 1 | " + " | ".join(f"{ratio[path]:.2f}x" for path in PATHS) + " |")
        s16, p16 = ratio["server"], ratio["in-process"]
        tokens = model["tokens"]
        wall = {path: sum(tokens) / median(rates[path, 16]) for path in ("server", "in-process")}
        lines += ["", f"16 / 1: server {s16:.2f}x, in-process {p16:.2f}x. Tokens per request: {min(tokens)}-"
                  f"{max(tokens)} (the server's output_token_count). 16 concurrent wall time: server "
                  f"{1000 * wall['server']:.0f} ms, in-process {1000 * wall['in-process']:.0f} ms: the server adds "
                  f"{1000 * (wall['server'] - wall['in-process']) / 16:.1f} ms per request. 409s retried: "
                  f"{model['refused']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--release-rounds", type=int, default=300, help="request pairs on 1 slot (default 300)")
    parser.add_argument("--burst-rounds", type=int, default=30, help="single + 16 bursts (default 30)")
    parser.add_argument("--chunks", type=int, default=128)
    parser.add_argument("--preset", default="bench-small")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-model", action="store_true", help="coglet alone")
    args = parser.parse_args()
    coglet = part_coglet(args)
    model = None if args.no_model else part_model(args)
    print(report(args, coglet, model))


if __name__ == "__main__":
    main()
