"""Soak: many mixed predictions through the real Cog server, watching memory, temp files and the cache.

Requests cycle through text-only and image prompts (one or two images), the `medical` and `none` adapters, a
custom `lora_weights` from a loopback file server, greedy and seeded sampling, stop sequences and bad requests
(a file that is not an image, too many placeholders). Every request must be answered (succeeded, or failed for
the bad ones); the worker's resident memory after warm-up must not grow beyond a bound; temp files and the
adapter cache must stay within their limits.

A first phase sends `--large-requests` (16) requests at once, each with 8 large images (3000x3000 PNGs from the
loopback file server), and reports the worker's peak resident memory (VmHWM) over that phase.

    make tiny
    .venv/bin/python bench/soak.py [--requests 300] [--large-requests 16] [--json PATH]
"""

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from PIL import Image  # noqa: E402

from bench.stats import report_and_exit  # noqa: E402
from idefics_cog.adapters.downloads import directory_bytes  # noqa: E402
from idefics_dev.cogrunner import CogServer  # noqa: E402
from tests.support.fileserver import FileServer  # noqa: E402
from tests.support.helpers import data_uri, noise_image, tar_bytes  # noqa: E402
from tests.support.hostile import worker_rss  # noqa: E402

TINY = ROOT / "weights" / "tiny"
RSS_GROWTH_LIMIT = 64 << 20  # bytes the worker may grow after warm-up
WARMUP = 20


def requests_for(index: int, custom: str) -> tuple[dict, bool]:
    """The index-th request of the cycle, and whether it must succeed."""
    image = data_uri(noise_image(index % 7))
    kind = index % 10
    if kind == 8:
        return {"image": data_uri(b"%PDF-1.4 not an image", "application/pdf")}, False
    if kind == 9:
        return {"prompt": "<image> and <image>", "image": image}, False
    inputs = {"prompt": f"Question {index}: what is shown?", "max_new_tokens": 8 + index % 24,
              "adapter": ("medical", "none")[index % 2]}
    if kind in (1, 2, 3, 5, 6):
        inputs["image"] = image
    if kind == 3:
        inputs["images"] = [data_uri(noise_image(index % 5 + 10))]
        inputs["prompt"] = "Compare <image> with <image>."
    if kind in (4, 5):
        inputs.update(temperature=0.8, top_p=0.9, top_k=40, seed=index)
    if kind == 6:
        inputs["lora_weights"] = custom
    if kind == 7:
        inputs["stop_sequences"] = "e,a"
    return inputs, True


def worker_peak(server: CogServer) -> int:
    """The largest peak resident set (VmHWM, bytes) among the server's child processes: the Python worker's."""
    peaks = [0]
    for child in psutil.Process(server.process.pid).children(recursive=True):
        for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) << 10)  # kB
    return max(peaks)


def large_png(seed: int, side: int) -> bytes:
    """A side x side RGB picture that PNG compresses well (smooth bands), so the file stays small while the
    decoded image is side * side * 3 bytes."""
    ramp = np.arange(side, dtype=np.uint16)
    red = ((ramp[None, :] + seed * 37) % 256).astype(np.uint8).repeat(side, 0)
    green = ((ramp[:, None] * 2 + seed * 11) % 256).astype(np.uint8).repeat(side, 1)
    blue = np.full((side, side), seed * 29 % 256, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([red, green, blue]), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def large_images(server: CogServer, files: FileServer, requests: int, per_request: int = 8,
                 side: int = 3000) -> dict:
    """`requests` requests at once, each with `per_request` large images: the worker's peak memory over it."""
    urls = [files.add(f"/large-{i}.png", large_png(i, side)) for i in range(per_request)]
    inputs = {"prompt": "Compare these pictures.", "images": urls, "max_new_tokens": 4}
    before = worker_peak(server)
    started = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        results = list(pool.map(lambda _: server.predict(inputs), range(requests)))
    return {"large requests": requests, "large images per request": f"{per_request} x {side}x{side} PNG",
            "large succeeded": sum(r["status"] == "succeeded" for r in results),
            "large wall s": time.perf_counter() - started,
            "worker peak before large MB": before / 2**20, "worker peak after large MB": worker_peak(server) / 2**20}


def temp_files(folder: Path) -> int:
    return sum(1 for _ in folder.iterdir())


def soak(count: int, large_requests: int = 0) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="soak-cache-"))
    temp = Path(tempfile.mkdtemp(prefix="soak-tmp-"))  # the server's own TMPDIR: nobody else's files counted
    env = {"TMPDIR": str(temp), "IDEFICS_BASE_WEIGHTS": str(TINY / "base"),
           "IDEFICS_ADAPTER_WEIGHTS": str(TINY / "adapter"), "IDEFICS_CACHE_DIR": str(cache),
           "IDEFICS_ALLOW_PRIVATE_URLS": "1"}  # adapters from a loopback server
    results = {"succeeded": 0, "failed as expected": 0, "unexpected": []}
    rss, latencies = [], []
    with FileServer() as files, CogServer(env=env) as server:
        custom = files.add("/custom.tgz", tar_bytes(TINY / "adapter"))
        large = large_images(server, files, large_requests) if large_requests else {}
        for index in range(count):
            inputs, must_succeed = requests_for(index, custom)
            started = time.perf_counter()
            result = server.predict(inputs)
            latencies.append(1000 * (time.perf_counter() - started))
            if result["status"] == ("succeeded" if must_succeed else "failed"):
                results["succeeded" if must_succeed else "failed as expected"] += 1
            else:
                results["unexpected"].append((index, result["status"], result.get("error")))
            if index == WARMUP - 1:
                baseline_rss, baseline_temp = worker_rss(server), temp_files(temp)
            if index >= WARMUP - 1:
                rss.append(worker_rss(server))
        report = {
            "requests": count, **{k: v for k, v in results.items() if k != "unexpected"},
            "unexpected": results["unexpected"],
            "rss after warm-up MB": baseline_rss / 2**20, "rss max after warm-up MB": max(rss) / 2**20,
            "rss growth MB": (rss[-1] - baseline_rss) / 2**20,
            "temp entries growth": temp_files(temp) - baseline_temp,
            "adapter downloads bytes": directory_bytes(cache / "adapters"),
            "latency median ms": statistics.median(latencies), "health": server.health()["status"], **large,
        }
    report["ok"] = (not results["unexpected"] and rss[-1] - baseline_rss <= RSS_GROWTH_LIMIT
                    and report["temp entries growth"] <= 5 and report["health"] == "READY"
                    and large.get("large succeeded", 0) == large_requests)
    for folder in (cache, temp):
        shutil.rmtree(folder, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--large-requests", type=int, default=16,
                        help="concurrent requests of 8 large images each, first (0: none)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (TINY / "COMPLETE").exists():
        sys.exit(f"no tiny model in {TINY}: run `make tiny` first")
    report = soak(args.requests, args.large_requests)
    report_and_exit("soak", report, args.json, digits=1)


if __name__ == "__main__":
    main()
