"""Archive URLs (weights/archive.py), with real requests against a loopback file server."""

import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from idefics_cog.errors import WeightsError
from idefics_cog.weights import stream
from idefics_cog.weights.archive import MARKER, entry_key, fetch_archive
from tests.support.fileserver import Fault

FAST = dict(retry_wait=0, read_timeout=10)
FILES = {"config.json": b'{"model_type": "idefics"}', "weights/model.safetensors": random.Random(0).randbytes(900_000)}
BIG = 5 * (256 << 10)  # bytes of the big archive's one member

pytestmark = pytest.mark.usefixtures("online_without_pget")


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
    """An uncompressed tar of BIG incompressible bytes."""
    data = random.Random(1).randbytes(BIG)
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


def entries(cache: Path) -> list[str]:
    """The archives/ folder's extracted entries (folders)."""
    folder = cache / "archives"
    return sorted(path.name for path in folder.iterdir() if path.is_dir()) if folder.exists() else []


def partial_files(cache: Path) -> list[Path]:
    return list(cache.rglob("*.part"))


def test_download_once_then_cache_hit_without_any_request(file_server, cache):
    data = tar_bytes(FILES)
    url = file_server.add("/model.tar.gz", data)
    first = fetch_archive(url, cache, **FAST)
    assert tree(first) == FILES
    requests_after_first = file_server.count("/model.tar.gz")

    assert fetch_archive(url, cache, **FAST) == first
    assert file_server.count("/model.tar.gz") == requests_after_first  # the cache hit asked the server nothing
    assert file_server.bytes_served("/model.tar.gz") == len(data)
    assert file_server.ranges("/model.tar.gz") == [None]  # the whole file, in one request
    # The layout: an extracted, marked entry; no download left behind; the guard file.
    key = entry_key(url)
    assert key.startswith("model-") and first == cache / "archives" / key
    assert json.loads((first / MARKER).read_text())["sha256"] == hashlib.sha256(data).hexdigest()
    assert partial_files(cache) == []
    assert sorted(p.name for p in (cache / "archives").iterdir()) == [key, f"{key}.guard"]


def test_dropped_connection_is_downloaded_again_from_the_start(file_server, cache):
    data = big_archive()
    url = file_server.add("/big.tar", data, Fault(drop_after=100_000, times=2))  # the first two GETs are cut short
    result = fetch_archive(with_sha(url, data), cache, **FAST)
    assert (result / "model.bin").read_bytes() == random.Random(1).randbytes(BIG)
    assert file_server.count("/big.tar", "GET") == 3 and file_server.ranges("/big.tar") == [None] * 3


def test_a_failed_download_leaves_nothing_behind(file_server, cache):
    url = file_server.add("/big.tar", big_archive(), Fault(drop_after=100_000, times=1))
    with pytest.raises(WeightsError, match=f"{url}: connection failed"):
        fetch_archive(url, cache, **{**FAST, "retries": 0})
    assert entries(cache) == [] and partial_files(cache) == []


def test_corrupt_download_is_detected_and_fetched_again(file_server, cache, caplog):
    data = big_archive()
    url = file_server.add("/big.tar", data, Fault(corrupt=True, times=1))  # the whole first download
    result = fetch_archive(with_sha(url, data), cache, **FAST)
    assert (result / "model.bin").read_bytes() == random.Random(1).randbytes(BIG)
    assert file_server.count("/big.tar", "GET") == 2
    assert "corrupt" in caplog.text


def test_wrong_sha256_is_an_error_and_caches_nothing(file_server, cache):
    data = tar_bytes(FILES)
    url = file_server.add("/model.tgz", data)
    with pytest.raises(WeightsError, match=f"{url}: the download is corrupt again .*sha256"):
        fetch_archive(with_sha(url, b"something else"), cache, **FAST)
    assert file_server.count("/model.tgz", "GET") == 2  # fetched again once, no more
    assert entries(cache) == [] and partial_files(cache) == []


def test_cached_copy_with_another_sha256_is_replaced(file_server, cache):
    old, new = tar_bytes({"a.txt": b"old"}), tar_bytes({"a.txt": b"new"})
    url = file_server.add("/model.tgz", old)
    first = fetch_archive(with_sha(url, old), cache, **FAST)
    file_server.add("/model.tgz", new)
    second = fetch_archive(with_sha(url, new), cache, **FAST)
    assert second == first and (second / "a.txt").read_bytes() == b"new"
    assert entries(cache) == [entry_key(url)]


def test_http_404_names_the_url(file_server, cache):
    url = file_server.add("/missing.tgz", b"", Fault(status=404))
    with pytest.raises(WeightsError, match=f"{url}: HTTP 404"):
        fetch_archive(url, cache, **FAST)
    assert entries(cache) == []


def test_timeout_names_the_url(file_server, cache):
    url = file_server.add("/slow.tgz", tar_bytes(FILES), Fault(delay=30))
    with pytest.raises(WeightsError, match=f"{url}: timed out after 0.2 s"):
        fetch_archive(url, cache, **{**FAST, "read_timeout": 0.2, "retries": 1})


def test_progress_and_stage_times_are_logged(file_server, cache, caplog, monkeypatch):
    monkeypatch.setattr(stream, "PROGRESS_EVERY", 0.0)  # every block, instead of every few seconds
    caplog.set_level(logging.INFO, logger="idefics_cog.weights")
    url = file_server.add("/big.tar", big_archive())
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
def test_unsafe_archive_is_refused_and_leaves_nothing(file_server, cache, name, data, message):
    url = file_server.add(f"/{name}", data)
    with pytest.raises(WeightsError, match=f"{url}: archive member {message}"):
        fetch_archive(url, cache, **FAST)
    assert entries(cache) == [] and partial_files(cache) == []
    assert not (cache / "evil.txt").exists() and not (cache.parent / "evil.txt").exists()


def test_offline_uses_the_cache_without_a_request(file_server, cache, monkeypatch):
    url = file_server.add("/model.tgz", tar_bytes(FILES))
    online = fetch_archive(url, cache, **FAST)
    file_server.reset_counts()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_archive(url, cache, **FAST) == online
    assert file_server.count("/model.tgz") == 0


def test_offline_without_the_cache_fails_clearly(file_server, cache, monkeypatch):
    url = file_server.add("/model.tgz", tar_bytes(FILES))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=f"{url}: not in the cache at {cache}"):
        fetch_archive(url, cache, **FAST)
    assert file_server.count("/model.tgz") == 0


def fetch_in_process(url: str, cache: str, start, results) -> None:
    """A separate (spawned) process: wait for the other one, then fetch."""
    start.wait()
    try:
        results.put(str(fetch_archive(url, Path(cache), **FAST)))
    except Exception as exc:  # reported to the test, which fails with it
        results.put(f"error: {exc!r}")


def test_two_processes_fetching_at_once_download_once(file_server, cache):
    data = big_archive()
    url = file_server.add("/big.tar", data)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=fetch_in_process, args=(url, str(cache), start, results)) for _ in range(2)]
    for process in processes:
        process.start()
    paths = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert paths[0] == paths[1] and Path(paths[0]).is_dir(), paths
    assert (Path(paths[0]) / "model.bin").stat().st_size == BIG
    assert file_server.count("/big.tar", "GET") == 1  # one download between them
    assert file_server.bytes_served("/big.tar") == len(data)


@pytest.mark.parametrize("top", ["", "mymodel/"], ids=["files", "one-top-directory"])
@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz", ".zip"])
def test_archive_formats(file_server, cache, suffix, top):
    if suffix == ".zip":
        data = zip_bytes(FILES, top)
    else:
        data = tar_bytes(FILES, "w" if suffix == ".tar" else "w:gz", top)
    url = file_server.add(f"/model{suffix}", data)
    result = fetch_archive(url, cache, **FAST)
    assert tree(result) == FILES
    assert result.name == ("mymodel" if top else entry_key(url))


def test_pget_does_the_transfer_when_on_path(file_server, cache, tmp_path, monkeypatch):
    data = tar_bytes(FILES)
    url = file_server.add("/model.tgz", data)
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
    part = cache / "archives" / f"{entry_key(url)}.part"
    assert json.loads(calls.read_text()) == [url, str(part)]  # no fragment for pget
    assert file_server.ranges("/model.tgz") == [None]


# --- caps for a request's adapter: bytes received, bytes extracted, a deadline ---------------------------------


def test_a_server_that_announces_less_than_it_sends_is_cut_off_at_the_cap(file_server, cache):
    data = tar_bytes({"weights.safetensors": random.Random(1).randbytes(400_000)}, mode="w")
    url = file_server.add("/liar.tar", data, Fault(no_length=True))  # announces nothing, sends more than the cap
    with pytest.raises(WeightsError, match=r"more than the limit of 100000 bytes received; stopped"):
        fetch_archive(url, cache, **FAST, max_bytes=100_000)
    assert file_server.bytes_served("/liar.tar") <= len(data)
    assert not list(cache.rglob("*.part")) and entries(cache) == []


def test_an_archive_announced_over_the_cap_is_not_downloaded(file_server, cache):
    url = file_server.add("/big.tar", big_archive())
    with pytest.raises(WeightsError, match=r"big.tar: \d+ bytes, over the limit of 100000 bytes; not downloaded"):
        fetch_archive(url, cache, **FAST, max_bytes=100_000)
    assert not list(cache.rglob("*.part")) and entries(cache) == []


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_an_archive_that_expands_past_the_cap_is_not_extracted(file_server, cache, kind):
    files = {"a.safetensors": bytes(300_000), "b.safetensors": bytes(300_000)}  # zeros: compress to almost nothing
    if kind == "tar.gz":
        data = tar_bytes(files)
    else:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zip_file:
            for name, content in files.items():
                zip_file.writestr(name, content)
        data = buffer.getvalue()
    url = file_server.add(f"/bomb.{kind}", data)
    assert len(data) < 100_000
    with pytest.raises(WeightsError, match=r"members add up to more than the limit of 500000 bytes; not extracted"):
        fetch_archive(url, cache, **FAST, max_bytes=500_000)
    assert entries(cache) == [] and not list(cache.rglob("*.safetensors"))


def test_a_trickling_server_is_stopped_at_the_deadline(file_server, cache):
    import time

    url = file_server.add("/slow.tar", tar_bytes(FILES, mode="w"), Fault(trickle=30.0))
    started = time.monotonic()
    with pytest.raises(WeightsError, match=r"did not finish within its deadline"):
        fetch_archive(url, cache, **FAST, max_bytes=10 << 20, deadline=time.monotonic() + 1.0)
    assert time.monotonic() - started < 5
    assert not list(cache.rglob("*.part"))


def test_a_redirect_loop_is_a_weights_error_naming_the_url(file_server, cache):
    url = file_server.url("/loop.tgz")
    file_server.add("/loop.tgz", b"", Fault(status=302, location=url))
    with pytest.raises(WeightsError, match=r"loop.tgz: TooManyRedirects \(Exceeded 30 redirects.\)"):
        fetch_archive(url, cache, **FAST, max_bytes=1 << 20)
