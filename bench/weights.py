"""Weights and adapters on the tiny model: setup cold vs warm, adapter switches, and download throughput.

Sources are served by a real HTTP server on 127.0.0.1 (tests/support/fileserver.py), as tarballs:

  setup        Predictor.setup() with the base and the adapter as tarball URLs: cold (empty cache: download,
               verify, extract, load) and warm (the same cache again: load only)
  switch       Service.answer with one new token, switching medical -> none -> custom -> medical; the first
               custom request (download + load) against the same adapter again (loaded: no download, no load)
  download     a large archive: our download (one stream, or pget on PATH; sha256, extract) against `curl` then `tar -x`
               on the same file from the same server

    make tiny
    .venv/bin/python bench/weights.py [--repeats 5] [--download-mib 512] [--json PATH]
"""

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import cog  # noqa: E402

from bench.stats import median_table  # noqa: E402
from idefics_cog.weights.archive import fetch_archive  # noqa: E402
from tests.support.fileserver import FileServer  # noqa: E402
from tests.support.helpers import data_uri, noise_image, tar_bytes  # noqa: E402

TINY = ROOT / "weights" / "tiny"


def timed(fn) -> float:
    """Milliseconds `fn()` took."""
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


_WORK = tempfile.TemporaryDirectory(prefix="bench-weights-")  # removed when the benchmark exits
WORK = Path(_WORK.name)


def setup_times(server: FileServer, repeats: int) -> dict:
    from predict import Predictor

    cache = WORK / "cache"
    os.environ.update(IDEFICS_BASE_WEIGHTS=server.url("/base.tgz"), IDEFICS_ADAPTER_WEIGHTS=server.url("/adapter.tgz"),
                      IDEFICS_CACHE_DIR=str(cache), IDEFICS_MAX_LOADED_ADAPTERS="64",
                      IDEFICS_ALLOW_PRIVATE_URLS="1")  # lora_weights from the loopback file server
    cold, warm = [], []
    for _ in range(repeats):
        shutil.rmtree(cache, ignore_errors=True)
        cold.append(timed(lambda: Predictor().setup()))
        warm.append(timed(lambda: Predictor().setup()))
    predictor = Predictor()
    predictor.setup()
    return {"cold": cold, "warm": warm}, predictor


def switch_times(predictor, server: FileServer, repeats: int) -> dict:
    custom = server.url("/other.tgz")

    def ask(**adapter) -> float:
        received = cog.Path.validate(data_uri(noise_image(1))).convert()  # as coglet hands it over (serving/files.py)
        return timed(lambda: "".join(predictor.service.answer(prompt="Hi", image=received, max_new_tokens=1,
                                                              **adapter)))

    ask(lora_weights=custom)  # loaded once, then kept in memory
    times = {name: [] for name in ("medical -> medical (no switch)", "medical -> none", "none -> custom (loaded)",
                                   "custom -> medical", "custom, first use (download + load)")}
    for index in range(repeats):
        ask(adapter="medical")
        times["medical -> medical (no switch)"].append(ask(adapter="medical"))
        times["medical -> none"].append(ask(adapter="none"))
        times["none -> custom (loaded)"].append(ask(lora_weights=custom))
        times["custom -> medical"].append(ask(adapter="medical"))
        first_use = server.add(f"/first-{index}.tgz", server.files["/other.tgz"])  # a new source: download + load
        times["custom, first use (download + load)"].append(ask(lora_weights=first_use))
    return times


def download_times(server: FileServer, mib: int, repeats: int) -> dict:
    payload = os.urandom(mib << 20)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("blob.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    data = buffer.getvalue()
    url = server.add("/large.tar", data) + "#sha256=" + hashlib.sha256(data).hexdigest()
    ours, curl = [], []
    for _ in range(repeats):
        work = Path(tempfile.mkdtemp(dir=WORK))
        ours.append(timed(lambda: fetch_archive(url, work / "cache")))
        target = work / "curl"
        target.mkdir()
        curl.append(timed(lambda: subprocess.run(
            f"curl -sf -o {target}/large.tar {url.split('#')[0]} && tar -xf {target}/large.tar -C {target}",
            shell=True, check=True)))
        shutil.rmtree(work)
    return {"ours (stream + sha256 + extract)": ours, "curl + tar -x": curl}, len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--download-mib", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (TINY / "COMPLETE").exists():
        sys.exit(f"no tiny model in {TINY}: run `make tiny` first")
    other = WORK / "other"
    shutil.copytree(TINY / "adapter", other)
    with FileServer() as server:
        server.add("/base.tgz", tar_bytes(TINY / "base"))
        server.add("/adapter.tgz", tar_bytes(TINY / "adapter"))
        server.add("/other.tgz", tar_bytes(other))
        setup, predictor = setup_times(server, args.repeats)
        switch = switch_times(predictor, server, args.repeats)
        download, size = download_times(server, args.download_mib, max(3, args.repeats // 2))
    print(f"# Weights and adapters, tiny IDEFICS on CPU ({os.cpu_count()} CPUs), {args.repeats} repeats\n")
    print(median_table("setup", setup, "cold"), "\n")
    print(median_table("one-token prediction", switch, "medical -> medical (no switch)"), "\n")
    print(median_table(f"download of a {size / 2**20:.0f} MiB tar", download, "curl + tar -x"))
    mib_s = {name: size / 2**20 / (statistics.median(values) / 1000) for name, values in download.items()}
    print("\nthroughput: " + ", ".join(f"{name} {rate:.0f} MiB/s" for name, rate in mib_s.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"setup": setup, "switch": switch, "download": download}, indent=2))


if __name__ == "__main__":
    main()
