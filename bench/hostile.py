"""Hostile requests through the real Cog server: what they cost an ordinary request beside them, and what the server
keeps of a thousand refused ones.

Neighbours: an ordinary greedy request (the tiny model, 24 tokens, streamed) is timed alone, then beside four clients
that each send two requests a second, first ordinary ones (the baseline: a polite load of the same rate), then
hostile ones: prompts of the largest allowed size (tokenized, then refused by the context), the most and longest
stop sequences allowed, lora_weights over its length limit, and paths on the server; meanwhile more adapter sources
trickle than the server has fetch threads. Medians, and their ratios, from the same run.

Soak: `--refused` (1,000) refused requests, 8 at a time, every one different: sources on a loopback server that
answers 404, sources that are no URL nor hub id, adapters whose config asks for KaSA (downloaded, then refused),
lora_weights over the limit, paths on the server, prompts over the limit. The worker's resident memory after a
warm-up of 100 and at the end, what is left in the adapter cache and in the temporary folder.

    make tiny
    .venv/bin/python bench/hostile.py [--refused 1000] [--rounds 15] [--json PATH]
"""

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from bench.stats import report_and_exit  # noqa: E402
from idefics_cog.adapters.downloads import source_key  # noqa: E402
from idefics_cog.serving.textstream import TextStream  # noqa: E402
from idefics_dev.cogrunner import CogServer  # noqa: E402
from tests.support.fileserver import Fault, FileServer  # noqa: E402
from tests.support.helpers import adapter_copy, data_uri, noise_image, tar_bytes  # noqa: E402
from tests.support.hostile import worker_rss  # noqa: E402
from tests.support.server import send, succeeded  # noqa: E402

TINY = ROOT / "weights" / "tiny"
ORDINARY = {"prompt": "What does this X-ray show?", "image": data_uri(noise_image(3)), "max_new_tokens": 24}
RSS_GROWTH_LIMIT = 64 << 20  # bytes the worker may grow over the soak, after its warm-up
WARMUP = 100


def timed(server) -> float:
    started = time.perf_counter()
    succeeded(send(server, ORDINARY, stream=True))
    return time.perf_counter() - started


PACE_S = 0.5  # each load client sends a request at most this often


def load(server, stop: threading.Event, hostile: bool) -> list[threading.Thread]:
    """Four clients, each sending a request every PACE_S seconds until `stop`: ordinary ones, or hostile ones."""
    def client(kind: int) -> None:
        number = 0
        while not stop.is_set():
            number += 1
            started = time.monotonic()
            if not hostile:
                inputs = {**ORDINARY, "prompt": f"Question {kind}.{number}: what is shown?"}
            elif kind == 0:
                inputs = {"prompt": "word " * 19_999}  # 99,995 characters: tokenized, refused by the context
            elif kind == 1:
                inputs = {**ORDINARY, "stop_sequences": ",".join(f"{i}" + "ab" * 127 for i in range(16))}
            elif kind == 2:
                inputs = {**ORDINARY, "lora_weights": f"https://example.invalid/{number}" + "x" * 300_000}
            else:
                inputs = {**ORDINARY, "image": "/etc/passwd"}
            send(server, inputs)
            stop.wait(max(0.0, PACE_S - (time.monotonic() - started)))

    threads = [threading.Thread(target=client, args=(kind,), daemon=True) for kind in range(4)]
    for thread in threads:
        thread.start()
    return threads


def beside(server, hostile: bool, rounds: int) -> list[float]:
    stop = threading.Event()
    threads = load(server, stop, hostile)
    time.sleep(1.0)
    times = [timed(server) for _ in range(rounds)]
    stop.set()
    for thread in threads:
        thread.join(30)
    return times


def refused_inputs(index: int, files: FileServer, made: Path) -> dict:
    kind = index % 6
    if kind == 0:
        return {"prompt": "x", "lora_weights": files.url(f"/{index}/" + "m" * 1900 + ".tgz")}  # 404, remembered
    if kind == 1:
        return {"prompt": "x", "lora_weights": f"not a source {index} " + "n" * 1900}  # refused, remembered
    if kind == 2:
        url = files.add(f"/kasa-{index}.tgz", tar_bytes(adapter_copy(TINY / "adapter", made / str(index),
                                                                     {"kasa_config": {}})))
        return {"prompt": "x", "lora_weights": url}  # downloaded, refused, remembered, its cache entry removed
    if kind == 3:
        return {"prompt": "x", "lora_weights": "https://example.invalid/" + "o" * 300_000}  # over the length limit
    if kind == 4:
        return {"prompt": "x", "image": f"/tmp/{index}.png"}
    return {"prompt": "p" * 100_001}


def stop_check_us(stops: list[str], text: str, check, repeats: int = 20) -> float:
    """Median microseconds of one token's stop-prefix check."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        check(stops, text)
        samples.append(1e6 * (time.perf_counter() - started))
    return statistics.median(samples)


def stop_checks() -> dict:
    """The check of each token's text against the stop sequences, for the most and longest stops allowed (16 of 256
    characters) on text made to match each one almost whole (its worst case), and for the one stop of 400,000
    characters the issue found: the definition (quadratic in a stop's length, the code before) against this code."""
    def definition(stops, text):
        return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    def this_code(stops, text):
        stream = TextStream.__new__(TextStream)
        stream.stop_sequences = stops
        return stream._stop_prefix_length(text)

    limit = [f"{i:x}" + "a" * 254 + "b" for i in range(16)]
    worst = "x" * 100 + "a" * 255  # every stop's first 255 characters but its own first one: many candidates
    issue = ["c" * 400_000]
    return {"stop check, 16 x 256 (the limit), definition us": stop_check_us(limit, worst, definition),
            "stop check, 16 x 256 (the limit), this code us": stop_check_us(limit, worst, this_code),
            "stop check, 1 x 400,000 (refused now), definition us": stop_check_us(issue, "c" * 2000, definition, 3),
            "stop check, 1 x 400,000, this code us": stop_check_us(issue, "c" * 2000, this_code, 3)}


def coglet_temp_files() -> int:
    return sum(1 for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("tmp"))


def run(refused: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="hostile-") as work:
        return run_in(Path(work) / "cache", Path(work) / "made", refused, rounds)


def run_in(cache: Path, made: Path, refused: int, rounds: int) -> dict:
    cache.mkdir()
    made.mkdir()
    env = {"IDEFICS_BASE_WEIGHTS": str(TINY / "base"), "IDEFICS_ADAPTER_WEIGHTS": str(TINY / "adapter"),
           "IDEFICS_CACHE_DIR": str(cache), "IDEFICS_ALLOW_PRIVATE_URLS": "1"}
    report: dict = stop_checks()
    with FileServer() as files, CogServer(env=env) as server:
        timed(server)
        alone = [timed(server) for _ in range(rounds)]
        polite = beside(server, False, rounds)
        slow = [files.add(f"/slow-{i}.tgz", tar_bytes(TINY / "adapter"), Fault(trickle=120.0)) for i in range(6)]
        trickling = [threading.Thread(target=send, args=(server, {**ORDINARY, "lora_weights": url}), daemon=True)
                     for url in slow]
        for thread in trickling:
            thread.start()
        hostile = beside(server, True, rounds)
        report.update({"ordinary alone median s": statistics.median(alone),
                       "beside a polite load median s": statistics.median(polite),
                       "beside a hostile load median s": statistics.median(hostile),
                       "polite / alone": statistics.median(polite) / statistics.median(alone),
                       "hostile / polite": statistics.median(hostile) / statistics.median(polite)})
        failed = 0

        def one(index: int) -> bool:
            return server.predict(refused_inputs(index, files, made))["status"] == "failed"

        with ThreadPoolExecutor(8) as pool:
            failed += sum(pool.map(one, range(WARMUP)))
            rss_warm, temp_warm = worker_rss(server), coglet_temp_files()
            started = time.perf_counter()
            failed += sum(pool.map(one, range(WARMUP, refused)))
        report.update({
            "refused requests": refused, "failed as expected": failed,
            "refused per s": (refused - WARMUP) / (time.perf_counter() - started),
            "worker rss after warm-up MB": rss_warm / 2**20, "worker rss at the end MB": worker_rss(server) / 2**20,
            "rss growth MB": (worker_rss(server) - rss_warm) / 2**20,
            "adapter cache entries left": len([entry for entry in (cache / "adapters").iterdir()
                                               if entry.name not in {source_key(url) for url in slow}]),
            "temp files growth": coglet_temp_files() - temp_warm,
            "ordinary after the soak s": timed(server), "health": server.health()["status"]})
    report["ok"] = (report["failed as expected"] == refused and report["rss growth MB"] * 2**20 <= RSS_GROWTH_LIMIT
                    and report["adapter cache entries left"] == 0 and report["temp files growth"] <= 0
                    and report["health"] == "READY")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refused", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (TINY / "COMPLETE").exists():
        sys.exit(f"no tiny model in {TINY}: run `make tiny` first")
    report = run(args.refused, args.rounds)
    report_and_exit("hostile requests", report, args.json, digits=3)


if __name__ == "__main__":
    main()
