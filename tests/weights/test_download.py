"""Weights archives at http(s) URLs (weights/archive.py, cache.py, transfer.py, extract.py), with real requests against a loopback file server."""

import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from idefics_cog.weights import archive as download, resolve as weights, transfer
from idefics_cog.weights.cancel import Cancel, Cancelled
from idefics_cog.weights.archive import MARKER, fetch_archive
from idefics_cog.config import ROOT
from idefics_cog.weights.base import WeightsError
from tests.support.fileserver import Fault, FileServer

CHUNK = 256 << 10  # small ranges, so that small files have several
FAST = dict(chunk_size=CHUNK, threads=4, retry_wait=0, read_timeout=10)
FILES = {"config.json": b'{"model_type": "idefics"}', "weights/model.safetensors": random.Random(0).randbytes(900_000)}
SIZE_CHUNKS = 5  # a payload of this many full chunks plus a short one


@pytest.fixture(autouse=True)
def online_without_pget(monkeypatch):
    """Online, and our own downloader even on a machine where pget is installed."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    path = [folder for folder in os.environ.get("PATH", "").split(os.pathsep) if not (Path(folder) / "pget").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(path))


@pytest.fixture
def server():
    with FileServer() as running:
        yield running


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz", top: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(top + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes], top: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zip_file:
        for name, data in files.items():
            zip_file.writestr(top + name, data)
    return buffer.getvalue()


def big_archive() -> bytes:
    """An (uncompressed, incompressible) tar of SIZE_CHUNKS full ranges and a bit."""
    data = random.Random(1).randbytes(SIZE_CHUNKS * CHUNK)
    return tar_bytes({"model.bin": data}, mode="w")


def with_sha(url: str, data: bytes) -> str:
    return f"{url}#sha256={hashlib.sha256(data).hexdigest()}"


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, except the completeness marker."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file() and path.name != MARKER
    }


def entries(cache: Path, folder: str) -> list[str]:
    return sorted(path.name for path in (cache / folder).iterdir()) if (cache / folder).exists() else []


def chunks_of(size: int) -> int:
    return -(-size // CHUNK)


def test_download_once_then_cache_hit_without_any_request(server, cache):
    data = tar_bytes(FILES)
    url = server.add("/model.tar.gz", data)
    first = fetch_archive(url, cache, **FAST)
    assert tree(first) == FILES
    requests_after_first = server.count("/model.tar.gz")

    assert fetch_archive(url, cache, **FAST) == first
    assert server.count("/model.tar.gz") == requests_after_first  # the cache hit asked the server nothing
    assert server.bytes_served("/model.tar.gz") == len(data)
    # The layout: an extracted, marked entry; no download left behind; the lock file.
    key = download.cache_key(url)
    assert key.startswith("model-") and first == cache / "archives" / key
    assert json.loads((first / MARKER).read_text())["sha256"] == hashlib.sha256(data).hexdigest()
    assert entries(cache, "downloads") == []
    assert entries(cache, "locks") == [f"{key}.lock"]


def test_multichunk_file_is_fetched_in_parallel_ranges(server, cache):
    data = big_archive()
    # The server holds the first 4 range requests until all 4 are open at once: a serial client would fail.
    url = server.add("/big.tar", data, Fault(gather=4, times=4))
    result = fetch_archive(url, cache, **{**FAST, "retries": 0})
    assert (result / "model.bin").read_bytes() == random.Random(1).randbytes(SIZE_CHUNKS * CHUNK)
    expected = {f"bytes={start}-{min(start + CHUNK, len(data)) - 1}" for start in range(0, len(data), CHUNK)}
    assert sorted(server.ranges("/big.tar")) == sorted(expected)  # each range once
    assert server.bytes_served("/big.tar") == len(data)


def test_dropped_connection_is_resumed_where_it_stopped(server, cache):
    data = big_archive()
    # The first two GETs (full ranges, or the rest of one after a drop: all longer than 100 kB) are cut short.
    url = server.add("/big.tar", data, Fault(drop_after=100_000, times=2))
    result = fetch_archive(with_sha(url, data), cache, **FAST)
    assert (result / "model.bin").exists()
    starts = [int(header.split("=")[1].split("-")[0]) for header in server.ranges("/big.tar")]
    assert len(starts) == chunks_of(len(data)) + 2
    assert any(start % CHUNK for start in starts)  # a retry asked for the rest of its range only
    refetched = server.bytes_served("/big.tar") - len(data)
    assert 0 <= refetched < CHUNK  # bodies are read as they arrive (read1): a drop loses no byte received


def test_interrupted_download_is_resumed_by_the_next_call(server, cache):
    data = big_archive()
    # One thread, no retries: ranges 1 and 2 arrive, the 3rd is cut short and the call fails, as a killed
    # process would leave it.
    url = server.add("/big.tar", data, Fault(drop_after=100_000, skip=2, times=1))
    with pytest.raises(WeightsError, match=f"{url}: connection failed"):
        fetch_archive(url, cache, **{**FAST, "threads": 1, "retries": 0})
    assert entries(cache, "archives") == []
    state = json.loads((cache / "downloads" / f"{download.cache_key(url)}.json").read_text())
    (done_start, done_end), = state["done"]
    assert done_start == 0 and 2 * CHUNK < done_end < 3 * CHUNK

    server.reset_counts()
    result = fetch_archive(with_sha(url, data), cache, **FAST)
    assert (result / "model.bin").read_bytes() == random.Random(1).randbytes(SIZE_CHUNKS * CHUNK)
    assert server.bytes_served("/big.tar") == len(data) - done_end  # only the missing ranges
    assert min(int(header.split("=")[1].split("-")[0]) for header in server.ranges("/big.tar")) == done_end
    assert entries(cache, "downloads") == []


def test_corrupt_download_is_detected_and_fetched_again(server, cache, caplog):
    data = big_archive()
    chunks = chunks_of(len(data))
    url = server.add("/big.tar", data, Fault(corrupt=True, times=chunks))  # the whole first download
    result = fetch_archive(with_sha(url, data), cache, **FAST)
    assert (result / "model.bin").read_bytes() == random.Random(1).randbytes(SIZE_CHUNKS * CHUNK)
    assert server.count("/big.tar", "GET") == 2 * chunks
    assert "corrupt" in caplog.text


def test_wrong_sha256_is_an_error_and_caches_nothing(server, cache):
    data = tar_bytes(FILES)
    url = server.add("/model.tgz", data)
    with pytest.raises(WeightsError, match=f"{url}: the download is corrupt again .*sha256"):
        fetch_archive(with_sha(url, b"something else"), cache, **FAST)
    assert server.count("/model.tgz", "GET") == 2 * chunks_of(len(data))  # fetched again once, no more
    assert entries(cache, "archives") == [] and entries(cache, "downloads") == []


def test_cached_copy_with_another_sha256_is_replaced(server, cache):
    old, new = tar_bytes({"a.txt": b"old"}), tar_bytes({"a.txt": b"new"})
    url = server.add("/model.tgz", old)
    first = fetch_archive(with_sha(url, old), cache, **FAST)
    server.add("/model.tgz", new)
    second = fetch_archive(with_sha(url, new), cache, **FAST)
    assert second == first and (second / "a.txt").read_bytes() == b"new"
    assert entries(cache, "archives") == [download.cache_key(url)]


def test_http_404_names_the_url(server, cache):
    url = server.add("/missing.tgz", b"", Fault(status=404))
    with pytest.raises(WeightsError, match=f"{url}: HTTP 404"):
        fetch_archive(url, cache, **FAST)
    assert entries(cache, "archives") == []


def test_timeout_names_the_url(server, cache):
    url = server.add("/slow.tgz", tar_bytes(FILES), Fault(delay=30))
    with pytest.raises(WeightsError, match=f"{url}: timed out after 0.2 s"):
        fetch_archive(url, cache, **{**FAST, "read_timeout": 0.2, "retries": 1})


def test_progress_and_stage_times_are_logged(server, cache, caplog, monkeypatch):
    monkeypatch.setattr(transfer, "PROGRESS_EVERY", 0.0)  # every block, instead of every few seconds
    caplog.set_level(logging.INFO, logger="idefics_cog.weights")
    url = server.add("/big.tar", big_archive())
    fetch_archive(url, cache, **FAST)
    messages = [record.getMessage() for record in caplog.records if record.name.startswith("idefics_cog.weights.")]
    assert any(re.fullmatch(rf"{url}: [\d.]+ MB of 1\.3 MB \([\d.]+ MB/s\)", message) for message in messages)
    for stage in ("downloaded 1.3 MB in", "verified 1.3 MB (sha256 ", "extracted into"):
        assert any(message.startswith(f"{url}: {stage}") and message.endswith(("s", "MB/s)")) for message in messages)


def test_fragment_other_than_sha256_is_refused(cache):
    with pytest.raises(WeightsError, match="sha256=<64 hex digits>"):
        fetch_archive("http://127.0.0.1:9/model.tgz#md5=abc", cache)


def unsafe_tar(kind: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        ok = tarfile.TarInfo("config.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        bad = tarfile.TarInfo({"dotdot": "sub/../../evil.txt", "absolute": "/tmp/evil.txt"}.get(kind, "evil"))
        if kind == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, "config.json"
        elif kind == "device":
            bad.type, bad.devmajor, bad.devminor = tarfile.CHRTYPE, 1, 3
        bad.size = 0 if kind in ("symlink", "hardlink", "device") else 4
        tar.addfile(bad, io.BytesIO(b"evil"))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("dotdot.tgz", unsafe_tar("dotdot"), "'sub/../../evil.txt' points outside"),
        ("absolute.tgz", unsafe_tar("absolute"), "'/tmp/evil.txt' points outside"),
        ("symlink.tgz", unsafe_tar("symlink"), "'evil' is a symlink"),
        ("hardlink.tgz", unsafe_tar("hardlink"), "'evil' is a hard link"),
        ("device.tgz", unsafe_tar("device"), "'evil' is a device"),
        ("dotdot.zip", zip_bytes({"config.json": b"{}", "../evil.txt": b"evil"}), "'../evil.txt' points outside"),
    ],
)
def test_unsafe_archive_is_refused_and_leaves_nothing(server, cache, name, data, message):
    url = server.add(f"/{name}", data)
    with pytest.raises(WeightsError, match=f"{url}: archive member {message}"):
        fetch_archive(url, cache, **FAST)
    assert entries(cache, "archives") == [] and entries(cache, "downloads") == []
    assert not (cache / "evil.txt").exists() and not (cache.parent / "evil.txt").exists()


@pytest.mark.parametrize(
    "fault",
    [Fault(ignore_range=True), Fault(ignore_range=True, accept_ranges=True)],
    ids=["no-accept-ranges", "claims-ranges-but-answers-200"],
)
def test_server_without_range_support_gets_one_stream(server, cache, fault):
    data = big_archive()
    url = server.add("/big.tar", data, fault)
    result = fetch_archive(with_sha(url, data), cache, **FAST)
    assert (result / "model.bin").read_bytes() == random.Random(1).randbytes(SIZE_CHUNKS * CHUNK)
    assert None in server.ranges("/big.tar")  # the whole file, in one request


def test_offline_uses_the_cache_without_a_request(server, cache, monkeypatch):
    url = server.add("/model.tgz", tar_bytes(FILES))
    online = fetch_archive(url, cache, **FAST)
    server.reset_counts()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_archive(url, cache, **FAST) == online
    assert server.count("/model.tgz") == 0


def test_offline_without_the_cache_fails_clearly(server, cache, monkeypatch):
    url = server.add("/model.tgz", tar_bytes(FILES))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=f"{url}: not in the cache at {cache}"):
        fetch_archive(url, cache, **FAST)
    assert server.count("/model.tgz") == 0


def fetch_in_process(url: str, cache: str, start, results) -> None:
    """A separate (spawned) process: wait for the other one, then fetch."""
    start.wait()
    try:
        results.put(str(fetch_archive(url, Path(cache), **FAST)))
    except Exception as exc:  # reported to the test, which fails with it
        results.put(f"error: {exc!r}")


def test_two_processes_fetching_at_once_download_once(server, cache):
    data = big_archive()
    url = server.add("/big.tar", data)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=fetch_in_process, args=(url, str(cache), start, results)) for _ in range(2)]
    for process in processes:
        process.start()
    paths = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert paths[0] == paths[1] and Path(paths[0]).is_dir(), paths
    assert (Path(paths[0]) / "model.bin").stat().st_size == SIZE_CHUNKS * CHUNK
    assert server.count("/big.tar", "GET") == chunks_of(len(data))  # one download between them
    assert server.bytes_served("/big.tar") == len(data)


@pytest.mark.parametrize("top", ["", "mymodel/"], ids=["files", "one-top-directory"])
@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz", ".zip"])
def test_archive_formats(server, cache, suffix, top):
    if suffix == ".zip":
        data = zip_bytes(FILES, top)
    else:
        data = tar_bytes(FILES, "w" if suffix == ".tar" else "w:gz", top)
    url = server.add(f"/model{suffix}", data)
    result = fetch_archive(url, cache, **FAST)
    assert tree(result) == FILES
    assert result.name == ("mymodel" if top else download.cache_key(url))


def test_pget_does_the_transfer_when_on_path(server, cache, tmp_path, monkeypatch):
    data = tar_bytes(FILES)
    url = server.add("/model.tgz", data)
    bin_dir, calls = tmp_path / "bin", tmp_path / "pget-calls.json"
    bin_dir.mkdir()
    pget = bin_dir / "pget"  # a stand-in with pget's command line: `pget <url> <dest>`
    pget.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, urllib.request\n"
        f"open({str(calls)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        "urllib.request.urlretrieve(sys.argv[1], sys.argv[2])\n"
    )
    pget.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = fetch_archive(with_sha(url, data), cache, **FAST)
    assert tree(result) == FILES
    part = cache / "downloads" / f"{download.cache_key(url)}.part"
    assert json.loads(calls.read_text()) == [url, str(part)]  # no fragment for pget
    assert server.ranges("/model.tgz") == [None]


def tar_directory(folder: Path, top: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=top)
    return buffer.getvalue()


def test_resolved_url_is_a_loadable_model(server, cache, tiny_dir):
    from idefics_cog.serving.engine import Engine

    data = tar_directory(tiny_dir / "base", "tiny-idefics")
    url = server.add("/weights/tiny-idefics.tar.gz", data)
    path = weights.resolve(with_sha(url, data), cache)
    assert path.name == "tiny-idefics" and path.is_relative_to(cache)
    engine = Engine.load(path, "cpu")
    assert engine.model.config.model_type == "idefics"


def test_download_weights_script_fills_the_cache(server, cache, tiny_dir):
    base = server.add("/base.tar.gz", tar_directory(tiny_dir / "base", "base"))
    adapter = server.add("/adapter.tar", tar_directory(tiny_dir / "adapter", "adapter"))
    env = {
        **os.environ,
        "IDEFICS_BASE_WEIGHTS": base,
        "IDEFICS_ADAPTER_WEIGHTS": adapter,
        "IDEFICS_CACHE_DIR": str(cache),
    }
    run = subprocess.run(
        [str(ROOT / "script" / "download-weights")], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    base_path = Path(lines["base"].split(" -> ")[1])
    adapter_path = Path(lines["adapter"].split(" -> ")[1])
    assert lines["base"].startswith(f"{base} -> ") and (base_path / "config.json").is_file()
    assert lines["adapter"].startswith(f"{adapter} -> ") and (adapter_path / "adapter_config.json").is_file()
    assert base_path.is_relative_to(cache / "archives") and adapter_path.is_relative_to(cache / "archives")
    assert "downloaded" in run.stderr and "extracted" in run.stderr  # the stage logs

    # A second run (as at the next `cog push`) finds everything in the cache.
    server.reset_counts()
    again = subprocess.run(
        [str(ROOT / "script" / "download-weights")], env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and again.stdout == run.stdout
    assert server.requests == []


def test_download_weights_script_reports_a_failure(server, cache):
    env = {
        **os.environ,
        "IDEFICS_BASE_WEIGHTS": server.url("/nothing.tgz"),
        "IDEFICS_ADAPTER_WEIGHTS": "none",
        "IDEFICS_CACHE_DIR": str(cache),
    }
    run = subprocess.run(
        [str(ROOT / "script" / "download-weights")], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1
    assert f"base weights: {server.url('/nothing.tgz')}: HTTP 404" in run.stderr


# --- caps for a request's adapter: bytes received, bytes extracted, a deadline ---------------------------------


def test_a_server_that_announces_less_than_it_sends_is_cut_off_at_the_cap(server, cache):
    data = tar_bytes({"weights.safetensors": random.Random(1).randbytes(400_000)}, mode="w")
    url = server.add("/liar.tar", data, Fault(head_size=1000, accept_ranges=False))
    with pytest.raises(WeightsError, match=r"more than the limit of 100000 bytes received; stopped"):
        fetch_archive(url, cache, **FAST, max_bytes=100_000)
    assert server.bytes_served("/liar.tar") <= len(data)
    assert not list(cache.rglob("*.part")) and entries(cache, "archives") == []


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_an_archive_that_expands_past_the_cap_is_not_extracted(server, cache, kind):
    files = {"a.safetensors": bytes(300_000), "b.safetensors": bytes(300_000)}  # zeros: compress to almost nothing
    if kind == "tar.gz":
        data = tar_bytes(files)
    else:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zip_file:
            for name, content in files.items():
                zip_file.writestr(name, content)
        data = buffer.getvalue()
    url = server.add(f"/bomb.{kind}", data)
    assert len(data) < 100_000
    with pytest.raises(WeightsError, match=r"members add up to more than the limit of 500000 bytes; not extracted"):
        fetch_archive(url, cache, **FAST, max_bytes=500_000)
    assert entries(cache, "archives") == [] and not list(cache.rglob("*.safetensors"))


def test_a_trickling_server_is_stopped_at_the_deadline(server, cache):
    import time

    url = server.add("/slow.tar", tar_bytes(FILES, mode="w"), Fault(trickle=30.0))
    started = time.monotonic()
    with pytest.raises(WeightsError, match=r"did not finish within its deadline"):
        fetch_archive(url, cache, **FAST, max_bytes=10 << 20, deadline=time.monotonic() + 1.0)
    assert time.monotonic() - started < 5
    assert not list(cache.rglob("*.part"))


def test_fetch_file_caps_the_bytes_received_and_leaves_nothing_on_failure(server, tmp_path):
    """transfer.fetch_file, a request's hub adapter file: the cap holds on what arrives, whatever was announced."""
    import time

    url = server.add("/adapter_model.safetensors", os.urandom(5000))
    with pytest.raises(WeightsError, match=r"more than the limit of 4000 bytes received; stopped"):
        transfer.fetch_file(url, tmp_path / "adapter_model.safetensors", max_bytes=4000, deadline=time.monotonic() + 30)
    assert list(tmp_path.iterdir()) == []
    transfer.fetch_file(url, tmp_path / "adapter_model.safetensors", max_bytes=5000, deadline=time.monotonic() + 30)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == server.files["/adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_model.safetensors"]


def test_a_cancel_stops_a_trickling_download_at_once(server, tmp_path):
    """A request that goes away stops its download within a moment, even while the read waits on a slow server."""
    import threading
    import time

    url = server.add("/slow.safetensors", os.urandom(100_000), Fault(trickle=30.0))
    cancel = Cancel()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled, match="the request was cancelled; the download stopped"):
        transfer.fetch_file(url, tmp_path / "a", max_bytes=1 << 20, deadline=time.monotonic() + 60, cancel=cancel)
    assert time.monotonic() - started < 3 and list(tmp_path.iterdir()) == []
    deadline = time.monotonic() + 5
    while not server.abandoned["/slow.safetensors"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.abandoned["/slow.safetensors"] == 1  # the connection was closed mid-body


def test_a_redirect_loop_is_a_weights_error_naming_the_url(server, cache):
    url = server.url("/loop.tgz")
    server.add("/loop.tgz", b"", Fault(status=302, location=url))
    with pytest.raises(WeightsError, match=r"loop.tgz: TooManyRedirects \(Exceeded 30 redirects.\)"):
        fetch_archive(url, cache, **FAST, max_bytes=1 << 20)
