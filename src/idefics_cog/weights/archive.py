"""Weights archives at http(s) URLs: downloaded once into the cache, verified, safely extracted.

The Replicate weights-CDN convention: a .tar, .tar.gz/.tgz or .zip at an http(s) URL, optionally ending in
`#sha256=<64 hex>` (the sha256 of the archive file). Per archive, under the cache directory (`<key>` is the
file's stem plus a short sha256 of the URL without its fragment):

    archives/<key>/           the extracted archive, complete: its MARKER is written last, in a staging
                              directory that is then renamed into place, so a partial entry is never seen
    downloads/<key>.part      the archive being downloaded (deleted once extracted)
    downloads/<key>.json      the byte ranges of .part already downloaded, so a new process resumes there
    locks/<key>.lock          held while downloading and extracting: two processes never do it twice

The transfer uses parallel byte ranges with `requests` (or `pget` when it is on PATH), falls back to one stream
when the server has no range support, and retries a dropped connection from where it stopped.

`python -m idefics_cog.weights.archive` (`script/download-weights`) fills the cache with the configured weights before
`cog push`, so they can be baked into the image.
"""

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional
from urllib.parse import urlsplit

import requests
from filelock import FileLock, Timeout
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from idefics_cog.weights.base import UnreachableError, WeightsError, env_flag

log = logging.getLogger("idefics_cog.weights.archive")

CHUNK_SIZE = 32 << 20  # bytes per range request
THREADS = 8
CONNECT_TIMEOUT = 10.0  # seconds
READ_TIMEOUT = 60.0  # seconds without a byte from the server
RETRIES = 5  # per request, after a dropped connection, a timeout or a 5xx
RETRY_WAIT = 1.0  # seconds; the n-th retry waits (n - 1) times this
BLOCK = 64 << 10  # bytes read at a time; a dropped connection loses at most the block being read
PROGRESS_EVERY = 5.0  # seconds between two progress lines
MARKER = ".idefics-cog-archive.json"
SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
FRAGMENT = re.compile(r"^sha256=([0-9a-fA-F]{64})$")
# Ask for the bytes as stored: a server that gzips on the fly would make sizes and ranges meaningless.
HEADERS = {"Accept-Encoding": "identity"}


@dataclass(frozen=True)
class Options:
    chunk_size: int = CHUNK_SIZE
    threads: int = THREADS
    connect_timeout: float = CONNECT_TIMEOUT
    read_timeout: float = READ_TIMEOUT
    retries: int = RETRIES
    retry_wait: float = RETRY_WAIT
    max_bytes: Optional[int] = None  # refuse a larger archive, announced or received or extracted (requests)
    deadline: Optional[float] = None  # time.monotonic() by which the whole transfer must be done (requests)
    session: Optional[requests.Session] = None  # sends every request (sources.guarded_session for requests)


def fetch_archive(
    url: str,
    cache_dir: Path,
    *,
    chunk_size: int = CHUNK_SIZE,
    threads: int = THREADS,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    retries: int = RETRIES,
    retry_wait: float = RETRY_WAIT,
    max_bytes: Optional[int] = None,
    deadline: Optional[float] = None,
    session: Optional[requests.Session] = None,
) -> Path:
    """Return the directory holding the extracted archive at `url`, downloading it into `cache_dir` once.

    When the archive holds a single top-level directory, that directory is returned. For a request's adapter:
    `max_bytes` caps the bytes announced, received and extracted; `deadline` (a time.monotonic() value) ends the
    whole transfer; `session` sends the requests (and pget, which would bypass it, is not used). A transfer that
    fails leaves no partial download behind when `max_bytes` is set.
    """
    entry = Entry.of(url, Path(cache_dir))
    found = entry.lookup()
    if found is not None:
        log.info("%s: cached at %s", entry.url, found)
        return found
    if offline():
        raise UnreachableError(f"{entry.url}: not in the cache at {cache_dir}, and HF_HUB_OFFLINE=1 forbids downloading it")
    options = Options(chunk_size, threads, connect_timeout, read_timeout, retries, retry_wait, max_bytes, deadline,
                      session)
    for folder in (entry.final.parent, entry.part.parent, entry.lock.parent):
        folder.mkdir(parents=True, exist_ok=True)
    with _locked(entry):
        # Another process may have finished it while we waited for the lock.
        try:
            return entry.lookup() or _install(entry, options)
        except BaseException:
            if max_bytes is not None:  # a stranger's source: its partial bytes are not kept for a resume
                entry.discard_download()
            raise


def offline() -> bool:
    """HF_HUB_OFFLINE, read at call time, with the values huggingface_hub accepts."""
    return env_flag("HF_HUB_OFFLINE")


@dataclass(frozen=True)
class Entry:
    """Where one archive lives in the cache."""

    url: str  # without its fragment
    sha256: Optional[str]  # expected, from `#sha256=`
    key: str
    final: Path
    part: Path
    state: Path
    lock: Path

    @classmethod
    def of(cls, url: str, cache_dir: Path) -> "Entry":
        url, _, fragment = url.partition("#")
        match = FRAGMENT.match(fragment)
        if fragment and not match:
            raise WeightsError(f"{url}: the URL fragment must be sha256=<64 hex digits>, got {fragment!r}")
        key = cache_key(url)
        downloads = cache_dir / "downloads"
        return cls(
            url=url,
            sha256=match[1].lower() if match else None,
            key=key,
            final=cache_dir / "archives" / key,
            part=downloads / f"{key}.part",
            state=downloads / f"{key}.json",
            lock=cache_dir / "locks" / f"{key}.lock",
        )

    def lookup(self) -> Optional[Path]:
        """The extracted directory if the entry is complete (and has the expected sha256), else None."""
        try:
            marker = json.loads((self.final / MARKER).read_text())
        except (FileNotFoundError, ValueError):
            return None
        if self.sha256 and marker["sha256"] != self.sha256:
            log.info("%s: the cached copy has sha256 %s, the URL asks for %s", self.url, marker["sha256"], self.sha256)
            return None
        return self.final / marker["root"]

    def discard_download(self) -> None:
        self.part.unlink(missing_ok=True)
        self.state.unlink(missing_ok=True)


def cache_key(url: str) -> str:
    """`<stem>-<16 hex of sha256(url)>`: unique per URL, readable in a listing."""
    name = PurePosixPath(urlsplit(url).path).name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:48] or "archive"
    return f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


class _locked:
    """Hold the entry's file lock, saying so when another process has it."""

    def __init__(self, entry: Entry):
        self.entry, self.lock = entry, FileLock(entry.lock)

    def __enter__(self) -> None:
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            log.info("%s: another process is fetching it; waiting for %s", self.entry.url, self.entry.lock)
            self.lock.acquire()

    def __exit__(self, *exc) -> None:
        self.lock.release()


# --- download, verify, extract ---------------------------------------------------------------------------------


class _Corrupt(Exception):
    """The downloaded file is not the one announced (size or sha256)."""


def _install(entry: Entry, options: Options) -> Path:
    """Download, verify and extract the entry (its lock held); return the extracted directory."""
    for attempt in (1, 2):
        size = _download(entry, options)
        try:
            sha256 = _verify(entry, size)
            break
        except _Corrupt as exc:
            entry.discard_download()  # a resumed download must not keep the bad bytes
            if attempt == 2:
                raise WeightsError(f"{entry.url}: the download is corrupt again ({exc}); nothing was cached") from None
            log.warning("%s: the download is corrupt (%s); fetching it again", entry.url, exc)
    try:
        _extract(entry, sha256, options)
    finally:
        entry.discard_download()  # extracted, or a bad archive: either way the download is of no more use
    return entry.lookup()


def _verify(entry: Entry, size: Optional[int]) -> str:
    """Check the download against the announced size and the URL's sha256; return its sha256."""
    started = time.monotonic()
    actual = entry.part.stat().st_size
    if size is not None and actual != size:
        raise _Corrupt(f"{actual} bytes, the server announced {size}")
    with open(entry.part, "rb") as file:
        sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    if entry.sha256 and sha256 != entry.sha256:
        raise _Corrupt(f"sha256 {sha256}, the URL expects {entry.sha256}")
    log.info("%s: verified %s (sha256 %s) in %.1f s", entry.url, _mb(actual), sha256, time.monotonic() - started)
    return sha256


def _extract(entry: Entry, sha256: str, options: Options) -> None:
    """Extract into a staging directory beside the final one, mark it complete, then rename it into place."""
    started = time.monotonic()
    staging = entry.final.with_name(entry.key + ".staging")
    shutil.rmtree(staging, ignore_errors=True)  # left by a process that died while extracting
    staging.mkdir(parents=True)
    try:
        extract_archive(entry.part, staging, entry.url, zip_name=urlsplit(entry.url).path.lower().endswith(".zip"),
                        max_bytes=options.max_bytes)
        marker = {"url": entry.url, "sha256": sha256, "size": entry.part.stat().st_size, "root": _root(staging)}
        (staging / MARKER).write_text(json.dumps(marker, indent=1))
        _move_into_place(staging, entry.final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("%s: extracted into %s in %.1f s", entry.url, entry.final, time.monotonic() - started)


def extract_archive(archive: Path, dest: Path, label: str, zip_name: bool = False,
                    max_bytes: Optional[int] = None) -> None:
    """Extract a tar (any compression) or zip into `dest`, refusing members that could land outside it, and
    (`max_bytes`) an archive whose members add up to more than that (a small .tar.gz can expand enormously).
    `label` names the archive in errors (its URL, or the input it came from)."""
    if zip_name or not tarfile.is_tarfile(archive):
        _extract_zip(label, archive, dest, max_bytes)
    else:
        _extract_tar(label, archive, dest, max_bytes)


def _extract_tar(url: str, archive: Path, dest: Path, max_bytes: Optional[int] = None) -> None:
    with tarfile.open(archive, "r:*") as tar:
        # Members are checked as they are read: one pass, even over a .tar.gz.
        tar.extractall(dest, members=_checked_members(url, tar, max_bytes), filter="data")


def _check_total(url: str, total: int, max_bytes: Optional[int]) -> None:
    if max_bytes is not None and total > max_bytes:
        raise WeightsError(f"{url}: the archive's members add up to more than the limit of {max_bytes} bytes; "
                           f"not extracted")


def _checked_members(url: str, tar: tarfile.TarFile, max_bytes: Optional[int] = None):
    total = 0
    for member in tar:
        total += member.size
        _check_total(url, total, max_bytes)  # before the member is written
        kind = "a symlink" if member.issym() else "a hard link" if member.islnk() else None
        kind = kind or ("a device or fifo" if member.isdev() else None)
        if kind:
            raise WeightsError(f"{url}: archive member {member.name!r} is {kind}; refusing to extract it")
        _check_name(url, member.name)
        yield member


def _extract_zip(url: str, archive: Path, dest: Path, max_bytes: Optional[int] = None) -> None:
    try:
        with zipfile.ZipFile(archive) as zip_file:
            for name in zip_file.namelist():
                _check_name(url, name)
            # file_size is what the zip says; zipfile refuses a member whose data inflates past it.
            _check_total(url, sum(info.file_size for info in zip_file.infolist()), max_bytes)
            zip_file.extractall(dest)
    except zipfile.BadZipFile:
        raise WeightsError(f"{url}: not a .tar, .tar.gz or .zip archive") from None


def _check_name(url: str, name: str) -> None:
    """Refuse a member that would land outside the target: absolute, `..`, or a Windows drive."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
        raise WeightsError(f"{url}: archive member {name!r} points outside the archive; refusing to extract it")


def _root(extracted: Path) -> str:
    """The single top-level directory of an archive made with `tar czf x.tgz mymodel/`, else `.`."""
    children = list(extracted.iterdir())
    return children[0].name if len(children) == 1 and children[0].is_dir() else "."


def _move_into_place(staging: Path, final: Path) -> None:
    if final.exists():  # a stale entry (the URL now expects another sha256): set it aside first
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)


# --- the transfer ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    size: Optional[int]  # Content-Length; None when the server does not say
    ranges: bool  # Accept-Ranges: bytes
    validator: str  # ETag or Last-Modified: the resumed bytes must come from the same file


class _ServerError(Exception):
    """A 5xx or 429: worth retrying."""


class _RangesIgnored(Exception):
    """The server answered a Range request with the whole file."""


class _Stopped(Exception):
    """Another range failed; this one gave up early."""


RETRYABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _ServerError)


def _download(entry: Entry, options: Options) -> Optional[int]:
    """Fill entry.part with the whole file; return the size the server announced."""
    started = time.monotonic()
    remote = _retrying(entry.url, options, lambda: _probe(entry.url, options))
    if options.max_bytes is not None and (remote.size is None or remote.size > options.max_bytes):
        size = "an unannounced size" if remote.size is None else f"{remote.size} bytes"
        raise WeightsError(f"{entry.url}: {size}, over the limit of {options.max_bytes} bytes; not downloaded")
    pget = shutil.which("pget") if options.session is None else None  # pget would bypass the session's checks
    if pget:
        _download_with_pget(entry, pget)
    elif remote.ranges and remote.size:
        try:
            _RangeDownload(entry, remote, options).run()
        except _RangesIgnored:
            log.warning("%s: the server ignores Range requests; downloading it in one stream", entry.url)
            _download_stream(entry, remote, options)
    else:
        _download_stream(entry, remote, options)
    seconds = time.monotonic() - started
    size = entry.part.stat().st_size
    log.info("%s: downloaded %s in %.1f s (%.1f MB/s)", entry.url, _mb(size), seconds, size / 1e6 / max(seconds, 1e-3))
    return remote.size


def _probe(url: str, options: Options) -> Remote:
    with _request(url, options, method="HEAD") as response:
        headers = response.headers
    length = headers.get("Content-Length")
    return Remote(
        size=int(length) if length and length.isdigit() else None,
        ranges=headers.get("Accept-Ranges", "").lower() == "bytes",
        validator=headers.get("ETag") or headers.get("Last-Modified") or "",
    )


def _request(url: str, options: Options, method: str = "GET", headers: Optional[dict] = None) -> requests.Response:
    """One streamed request; an HTTP error becomes a WeightsError naming the URL (a _ServerError for 5xx/429)."""
    _check_deadline(url, options)
    remaining = options.deadline - time.monotonic() if options.deadline is not None else float("inf")
    response = (options.session or requests).request(
        method,
        url,
        headers={**HEADERS, **(headers or {})},
        stream=True,
        timeout=(min(options.connect_timeout, remaining), min(options.read_timeout, remaining)),
        allow_redirects=True,
    )
    if response.status_code >= 400:
        response.close()
        problem = f"HTTP {response.status_code} {response.reason or ''}".rstrip()
        if response.status_code >= 500 or response.status_code == 429:
            raise _ServerError(problem)
        raise WeightsError(f"{url}: {problem}")
    return response


def _check_deadline(url: str, options: Options) -> None:
    if options.deadline is not None and time.monotonic() > options.deadline:
        raise WeightsError(f"{url}: the download did not finish within its deadline "
                           f"(IDEFICS_ADAPTER_DOWNLOAD_SECONDS); stopped")


def _retrying(url: str, options: Options, attempt: Callable):
    """Call `attempt` until it succeeds, at most 1 + retries times; then a WeightsError that says why."""
    for number in range(options.retries + 1):
        try:
            return attempt()
        except RETRYABLE as exc:
            problem = _describe(exc, options)
            if number == options.retries:
                raise WeightsError(f"{url}: {problem} (after {options.retries} retries)") from exc
            log.warning("%s: %s; retrying (%d of %d)", url, problem, number + 1, options.retries)
            time.sleep(number * options.retry_wait)


def _describe(exc: Exception, options: Options) -> str:
    if isinstance(exc, requests.ConnectTimeout):
        return f"connecting timed out after {options.connect_timeout:g} s"
    # requests raises a read timeout in the middle of a body as a ConnectionError around urllib3's error.
    if isinstance(exc, requests.Timeout) or (exc.args and isinstance(exc.args[0], ReadTimeoutError)):
        return f"timed out after {options.read_timeout:g} s without data"
    if isinstance(exc, _ServerError):
        return str(exc)
    return f"connection failed ({_reason(exc)})"


def _reason(exc: BaseException) -> str:
    """The innermost readable message of a requests/urllib3 error (they nest)."""
    while exc.args and isinstance(exc.args[0], BaseException):
        exc = exc.args[0]
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)


class _RangeDownload:
    """The missing byte ranges of one file, fetched by several threads and written in place in .part.

    The ranges already written are saved in the state file after each one, so a later process resumes there.
    """

    def __init__(self, entry: Entry, remote: Remote, options: Options):
        self.entry, self.remote, self.options = entry, remote, options
        self.done = _load_state(entry, remote)
        self.stop = threading.Event()
        self.lock = threading.Lock()  # guards `done` and the state file
        self.fd = -1  # .part, open while run() runs
        self.progress = _Progress(entry.url, remote.size, done=sum(end - start for start, end in self.done))

    def run(self) -> None:
        pieces = _missing(self.done, self.remote.size, self.options.chunk_size)
        if self.done:
            already, size = _mb(self.progress.done), _mb(self.remote.size)
            log.info("%s: resuming: %s of %s already downloaded", self.entry.url, already, size)
        self.fd = os.open(self.entry.part, os.O_RDWR | os.O_CREAT)
        try:
            if not self.done:
                os.ftruncate(self.fd, 0)  # bytes of another (older) file must not survive
            os.ftruncate(self.fd, self.remote.size)
            self._fetch_all(pieces)
        finally:
            os.close(self.fd)

    def _fetch_all(self, pieces: list[tuple[int, int]]) -> None:
        with ThreadPoolExecutor(self.options.threads, thread_name_prefix="download") as pool:
            futures = [pool.submit(self._fetch, start, end) for start, end in pieces]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:  # on an error (or Ctrl-C), running ranges stop at their next block, their progress saved
                self.stop.set()
                for future in futures:
                    future.cancel()
        errors = [future.exception() for future in futures if not future.cancelled() and future.exception()]
        causes = [error for error in errors if not isinstance(error, _Stopped)]  # not the ranges they stopped
        if errors:
            raise (causes or errors)[0]

    def _fetch(self, start: int, end: int) -> None:
        """Bytes [start, end), resumed from where a dropped connection stopped."""
        position = start

        def attempt():
            nonlocal position
            if self.stop.is_set():
                raise _Stopped
            headers = {"Range": f"bytes={position}-{end - 1}"}
            with _request(self.entry.url, self.options, headers=headers) as response:
                if response.status_code != 206:
                    raise _RangesIgnored
                for block in _blocks(response):
                    if self.stop.is_set():
                        raise _Stopped
                    _check_deadline(self.entry.url, self.options)
                    block = block[: end - position]
                    os.pwrite(self.fd, block, position)
                    position += len(block)
                    self.progress.add(len(block))
            if position < end:
                raise requests.ConnectionError(f"the body ended after {position - start} of {end - start} bytes")

        try:
            _retrying(self.entry.url, self.options, attempt)
        except BaseException:
            self.stop.set()  # the download has failed: no range starts after this one
            raise
        finally:
            self._save(start, position)

    def _save(self, start: int, end: int) -> None:
        if end <= start:
            return
        with self.lock:
            self.done = _merge(self.done + [[start, end]])
            os.fsync(self.fd)  # the bytes reach the disk before the state that vouches for them
            state = {"url": self.entry.url, "size": self.remote.size, "validator": self.remote.validator}
            temporary = self.entry.state.with_suffix(".json.tmp")
            temporary.write_text(json.dumps({**state, "done": self.done}))
            temporary.replace(self.entry.state)


def _blocks(response: requests.Response):
    """The body as it arrives (read1: a trickling server cannot hold a block back past the deadline checks),
    with urllib3's errors raised as requests raises them (retryable)."""
    while True:
        try:
            block = response.raw.read1(BLOCK)
        except (ProtocolError, ReadTimeoutError) as exc:
            raise requests.ConnectionError(exc) from exc
        if not block:
            return
        yield block


def _load_state(entry: Entry, remote: Remote) -> list[list[int]]:
    """The ranges of .part already downloaded, when they belong to this same remote file."""
    try:
        state = json.loads(entry.state.read_text())
    except (FileNotFoundError, ValueError):
        return []
    same_file = (state.get("url"), state.get("size"), state.get("validator")) == (
        entry.url,
        remote.size,
        remote.validator,
    )
    return state.get("done", []) if same_file and entry.part.exists() else []


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _missing(done: list[list[int]], size: int, chunk_size: int) -> list[tuple[int, int]]:
    """The ranges [start, end) not in `done`, cut into pieces of at most chunk_size bytes."""
    pieces, position = [], 0
    for start, end in _merge(done) + [[size, size]]:
        while position < start:
            pieces.append((position, min(start, position + chunk_size)))
            position = pieces[-1][1]
        position = max(position, end)
    return pieces


def _download_stream(entry: Entry, remote: Remote, options: Options) -> None:
    """One GET of the whole file, for servers without ranges; a dropped connection starts it over."""
    entry.state.unlink(missing_ok=True)
    _stream(entry.url, entry.part, remote.size, options)


def fetch_file(url: str, target: Path, *, max_bytes: int, deadline: float) -> None:
    """`url` into `target` by one streamed GET (a request's hub adapter file: small, from the operator's hub), with
    the byte cap and the deadline checked on the bytes as they arrive; `target` appears only when whole, and a
    failed transfer leaves nothing behind."""
    partial = target.with_name(target.name + ".part")
    try:
        _stream(url, partial, None, Options(max_bytes=max_bytes, deadline=deadline))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _stream(url: str, path: Path, size: Optional[int], options: Options) -> None:
    """The body of one GET into `path`; a dropped connection starts it over (within the retries and deadline)."""

    def attempt():
        progress = _Progress(url, size)
        received = 0
        with _request(url, options) as response, open(path, "wb") as file:
            for block in _blocks(response):
                _check_deadline(url, options)
                received += len(block)
                if options.max_bytes is not None and received > options.max_bytes:  # whatever HEAD said
                    raise WeightsError(f"{url}: more than the limit of {options.max_bytes} bytes received; stopped")
                file.write(block)
                progress.add(len(block))

    _retrying(url, options, attempt)


def _download_with_pget(entry: Entry, pget: str) -> None:
    """pget does the transfer (it refuses to overwrite, so start from nothing); we verify and extract."""
    entry.discard_download()
    log.info("%s: downloading with %s", entry.url, pget)
    result = subprocess.run([pget, entry.url, str(entry.part)], capture_output=True, text=True)
    if result.returncode != 0:
        entry.discard_download()
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise WeightsError(f"{entry.url}: pget failed (exit {result.returncode}): {output}")


class _Progress:
    """Bytes done / total and the rate, logged at most every PROGRESS_EVERY seconds; thread-safe."""

    def __init__(self, url: str, total: Optional[int], done: int = 0):
        self.url, self.total, self.done, self.new = url, total, done, 0
        self.started = self.logged = time.monotonic()
        self.lock = threading.Lock()

    def add(self, count: int) -> None:
        with self.lock:
            self.done += count
            self.new += count
            now = time.monotonic()
            if now - self.logged < PROGRESS_EVERY:
                return
            self.logged = now
            done, rate = self.done, self.new / 1e6 / (now - self.started)
        log.info("%s: %s of %s (%.1f MB/s)", self.url, _mb(done), _mb(self.total), rate)


def _mb(size: Optional[int]) -> str:
    return "? MB" if size is None else f"{size / 1e6:.1f} MB"


# --- script/download-weights -----------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    from idefics_cog.config import Settings
    from idefics_cog.weights.resolve import resolve

    argparse.ArgumentParser(
        prog="script/download-weights",
        description="Download the weights named by IDEFICS_BASE_WEIGHTS and IDEFICS_ADAPTER_WEIGHTS into the cache "
        "(IDEFICS_CACHE_DIR, weights/ by default) so that `cog push` bakes them into the image.",
    ).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"download-weights: {exc}", file=sys.stderr)
        return 2
    sources = [("base", settings.base_weights)] + ([("adapter", settings.adapter_weights)]
                                                   if settings.adapter_weights else [])  # "" when `none`
    for role, source in sources:
        try:
            path = resolve(source, settings.cache_dir, adapter=role == "adapter")
        except WeightsError as exc:
            print(f"download-weights: {role} weights: {exc}", file=sys.stderr)
            return 1
        print(f"{role}: {source} -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
