"""The transfer of one file over http(s): parallel resumable byte ranges with `requests` (or `pget` when it is on
PATH), one stream when the server has no range support, retries from where a dropped connection stopped, a byte cap
and a deadline for a request's files."""

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import requests
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from idefics_cog.errors import shorten
from idefics_cog.weights.base import WeightsError
from idefics_cog.weights.cancel import Cancel
from idefics_cog.weights.cache import Entry

log = logging.getLogger("idefics_cog.weights.transfer")

CHUNK_SIZE = 32 << 20  # bytes per range request
THREADS = 8
CONNECT_TIMEOUT = 10.0  # seconds
READ_TIMEOUT = 60.0  # seconds without a byte from the server
RETRIES = 5  # per request, after a dropped connection, a timeout or a 5xx
RETRY_WAIT = 1.0  # seconds; the n-th retry waits (n - 1) times this
BLOCK = 64 << 10  # bytes read at a time; a dropped connection loses at most the block being read
PROGRESS_EVERY = 5.0  # seconds between two progress lines
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
    cancel: Optional[Cancel] = None  # stops the transfer when its request goes away
    deadline_setting: str = "IDEFICS_ADAPTER_DOWNLOAD_SECONDS"  # named when the deadline passes
    bytes_setting: Optional[str] = None  # named when max_bytes is passed


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


def download(entry: Entry, options: Options) -> Optional[int]:
    """Fill entry.part with the whole file; return the size the server announced."""
    started = time.monotonic()
    remote = _retrying(entry.url, options, lambda: _probe(entry.url, options))
    if options.max_bytes is not None and (remote.size is None or remote.size > options.max_bytes):
        size = "an unannounced size" if remote.size is None else f"{remote.size} bytes"
        raise WeightsError(f"{shorten(entry.url)}: {size}, over the limit of {options.max_bytes} bytes; not downloaded")
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
    log.info("%s: downloaded %s in %.1f s (%.1f MB/s)", entry.url, mb(size), seconds, size / 1e6 / max(seconds, 1e-3))
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
    try:
        response = (options.session or requests).request(
            method,
            url,
            headers={**HEADERS, **(headers or {})},
            stream=True,
            timeout=(min(options.connect_timeout, remaining), min(options.read_timeout, remaining)),
            allow_redirects=True,
        )
    except RETRYABLE:
        raise
    except requests.RequestException as exc:  # too many redirects, an invalid URL or scheme: not worth a retry
        raise WeightsError(f"{shorten(url)}: {type(exc).__name__} ({shorten(_reason(exc), 200)})") from None
    if response.status_code >= 400:
        response.close()
        problem = f"HTTP {response.status_code} {response.reason or ''}".rstrip()
        if response.status_code >= 500 or response.status_code == 429:
            raise _ServerError(problem)
        raise WeightsError(f"{shorten(url)}: {problem}")
    return response


def _check_deadline(url: str, options: Options) -> None:
    if options.cancel is not None:
        options.cancel.check(shorten(url))
    if options.deadline is not None and time.monotonic() > options.deadline:
        raise WeightsError(f"{shorten(url)}: the download did not finish within its deadline "
                           f"({options.deadline_setting}); stopped")


def _retrying(url: str, options: Options, attempt: Callable):
    """Call `attempt` until it succeeds, at most 1 + retries times; then a WeightsError that says why."""
    for number in range(options.retries + 1):
        try:
            return attempt()
        except RETRYABLE as exc:
            problem = _describe(exc, options)
            if number == options.retries:
                raise WeightsError(f"{shorten(url)}: {problem} (after {options.retries} retries)") from exc
            log.warning("%s: %s; retrying (%d of %d)", url, problem, number + 1, options.retries)
            if options.cancel is not None:
                options.cancel.wait(number * options.retry_wait)
            else:
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
            already, size = mb(self.progress.done), mb(self.remote.size)
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
                for block in _blocks(response, self.options):
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


def _blocks(response: requests.Response, options: Options):
    """The body as it arrives (read1: a trickling server cannot hold a block back past the deadline checks),
    with urllib3's errors raised as requests raises them (retryable). A cancel interrupts the read it waits in."""
    cancel = options.cancel
    with cancel.interrupting(response.raw.shutdown) if cancel is not None else nullcontext():
        while True:
            try:
                block = response.raw.read1(BLOCK)
            except (ProtocolError, ReadTimeoutError, OSError) as exc:
                if cancel is not None:
                    cancel.check(shorten(response.url))
                raise requests.ConnectionError(exc) from exc
            if cancel is not None:
                cancel.check(shorten(response.url))  # an interrupted read ends like the body
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


def fetch_file(url: str, target: Path, *, max_bytes: int, deadline: Optional[float],
               session: Optional[requests.Session] = None, cancel: Optional[Cancel] = None,
               settings: tuple[str, Optional[str]] = (Options.deadline_setting, None)) -> None:
    """`url` into `target` by one streamed GET (a request's hub adapter file, or an image URL), with the byte cap
    and the deadline checked on the bytes as they arrive; `target` appears only when whole, and a failed transfer
    leaves nothing behind. `session` sends it (sources.guarded_session for a stranger's URL); `settings` are the
    variables of the deadline and of the byte cap, named when one is passed."""
    partial = target.with_name(target.name + ".part")
    try:
        _stream(url, partial, None, Options(max_bytes=max_bytes, deadline=deadline, session=session, cancel=cancel,
                                            deadline_setting=settings[0], bytes_setting=settings[1]))
        if cancel is not None:  # its request may be gone, and its file removed: nothing is written after that
            cancel.check(shorten(url))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _stream(url: str, path: Path, size: Optional[int], options: Options) -> None:
    """The body of one GET into `path`; a dropped connection starts it over (within the retries and deadline)."""

    def attempt():
        progress = _Progress(url, size)
        received = 0
        with _request(url, options) as response, open(path, "wb") as file:
            for block in _blocks(response, options):
                _check_deadline(url, options)
                received += len(block)
                if options.max_bytes is not None and received > options.max_bytes:  # whatever HEAD said
                    setting = f" ({options.bytes_setting})" if options.bytes_setting else ""
                    raise WeightsError(f"{shorten(url)}: more than the limit of {options.max_bytes} bytes received; "
                                       f"stopped{setting}")
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
        log.info("%s: %s of %s (%.1f MB/s)", self.url, mb(done), mb(self.total), rate)


def mb(size: Optional[int]) -> str:
    return "? MB" if size is None else f"{size / 1e6:.1f} MB"

