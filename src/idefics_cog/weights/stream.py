"""A file over http(s) by one streamed GET, retried from the start after a dropped connection, with a byte cap, a
deadline and a cancel; the target appears only when whole."""

import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import requests
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from idefics_cog.errors import WeightsError, shorten

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds
READ_TIMEOUT = 60.0  # seconds without a byte from the server
RETRIES = 5  # after a dropped connection, a timeout, a 5xx or a 429
RETRY_WAIT = 1.0  # seconds; the n-th retry waits (n - 1) times this
BLOCK = 1 << 20
PROGRESS_EVERY = 5.0  # seconds between two progress lines
DEADLINE_SETTING = "IDEFICS_ADAPTER_DOWNLOAD_SECONDS"


class Cancelled(WeightsError):
    """The request that wanted the download went away: stopped, and not its source's fault."""


class Cancel:
    """Set by another thread to stop a download: checked between blocks, and it interrupts a read waiting on a slow
    server (urllib3's `HTTPResponse.shutdown`), so a cancelled request frees its thread at once."""

    def __init__(self):
        self._event, self._lock, self._interrupts = threading.Event(), threading.Lock(), []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            interrupts = list(self._interrupts)
        for interrupt in interrupts:
            try:
                interrupt()
            except Exception:  # noqa: BLE001 - a connection already closed: nothing left to interrupt
                pass

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)

    def check(self, what: str) -> None:
        if self._event.is_set():
            raise Cancelled(f"{what}: the request was cancelled; the download stopped")

    @contextmanager
    def interrupting(self, interrupt):
        """Call `interrupt` if the cancel comes while the block runs (or came just before it)."""
        with self._lock:
            self._interrupts.append(interrupt)
            cancelled = self._event.is_set()
        if cancelled:
            interrupt()
        try:
            yield
        finally:
            with self._lock:
                self._interrupts.remove(interrupt)


class _ServerError(Exception):
    """A 5xx or 429: worth retrying."""


RETRYABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _ServerError)


def fetch_file(url: str, target: Path, *, max_bytes: int | None = None, deadline: float | None = None,
               session: requests.Session | None = None, cancel: Cancel | None = None,
               settings: tuple[str, str | None] = (DEADLINE_SETTING, None), announced: bool = False,
               retries: int = RETRIES, read_timeout: float = READ_TIMEOUT, retry_wait: float = RETRY_WAIT) -> None:
    """`url` into `target`; a failed transfer leaves nothing behind. `max_bytes` caps the bytes received (`announced`:
    a larger Content-Length is refused before the body); `deadline` is a time.monotonic() value; `session` sends it
    (url_guard.guarded_session for a stranger's URL); `settings` name the deadline's and the cap's variables."""
    shown, (deadline_setting, bytes_setting) = shorten(url), (f" ({name})" if name else "" for name in settings)

    def check() -> None:
        if cancel is not None:
            cancel.check(shown)
        if deadline is not None and time.monotonic() > deadline:
            raise WeightsError(f"{shown}: the download did not finish within its deadline{deadline_setting}; stopped")

    def attempt(path: Path) -> None:
        check()
        remaining = deadline - time.monotonic() if deadline is not None else float("inf")
        try:  # identity: a server that gzips on the fly would make the sizes meaningless
            response = (session or requests).get(
                url, headers={"Accept-Encoding": "identity"}, stream=True, allow_redirects=True,
                timeout=(min(CONNECT_TIMEOUT, remaining), min(read_timeout, remaining)))
        except RETRYABLE:
            raise
        except requests.RequestException as exc:  # too many redirects, an invalid URL: not worth a retry
            raise WeightsError(f"{shown}: {type(exc).__name__} ({shorten(_reason(exc), 200)})") from None
        with response, open(path, "wb") as file:
            if response.status_code >= 400:
                problem = f"HTTP {response.status_code} {response.reason or ''}".rstrip()
                if response.status_code >= 500 or response.status_code == 429:
                    raise _ServerError(problem)
                raise WeightsError(f"{shown}: {problem}")
            length = response.headers.get("Content-Length", "")
            size = int(length) if length.isdigit() else None
            if announced and max_bytes is not None and size is not None and size > max_bytes:
                raise WeightsError(f"{shown}: {size} bytes, over the limit of {max_bytes} bytes; not downloaded"
                                   f"{bytes_setting}")
            received, started = 0, time.monotonic()
            logged = started
            for block in _blocks(response, cancel, shown):
                check()
                received += len(block)
                if max_bytes is not None and received > max_bytes:  # whatever was announced
                    raise WeightsError(f"{shown}: more than the limit of {max_bytes} bytes received; stopped"
                                       f"{bytes_setting}")
                file.write(block)
                if time.monotonic() - logged >= PROGRESS_EVERY:
                    logged = time.monotonic()
                    log.info("%s: %s of %s (%.1f MB/s)", url, mb(received), mb(size),
                             received / 1e6 / max(logged - started, 1e-3))
        if size is not None and received != size:
            raise requests.ConnectionError(f"the body ended after {received} of {size} bytes")

    partial = target.with_name(target.name + ".part")
    try:
        for number in range(retries + 1):
            try:
                attempt(partial)
                break
            except RETRYABLE as exc:
                problem = _describe(exc, read_timeout)
                if number == retries:
                    raise WeightsError(f"{shown}: {problem} (after {retries} retries)") from exc
                log.warning("%s: %s; retrying (%d of %d)", url, problem, number + 1, retries)
                (cancel.wait if cancel is not None else time.sleep)(number * retry_wait)
        if cancel is not None:  # its request may be gone, and its folder removed: nothing is written after that
            cancel.check(shown)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _blocks(response: requests.Response, cancel: Cancel | None, shown: str):
    """The body as it arrives (read1: a trickling server cannot hold a block back past the deadline checks), urllib3's
    errors raised as requests raises them (retryable); a cancel interrupts the read it waits in."""
    with cancel.interrupting(response.raw.shutdown) if cancel is not None else nullcontext():
        while True:
            try:
                block = response.raw.read1(BLOCK)
            except (ProtocolError, ReadTimeoutError, OSError) as exc:
                if cancel is not None:
                    cancel.check(shown)
                raise requests.ConnectionError(exc) from exc
            if cancel is not None:
                cancel.check(shown)  # an interrupted read ends like the body
            if not block:
                return
            yield block


def _describe(exc: Exception, read_timeout: float) -> str:
    if isinstance(exc, requests.ConnectTimeout):
        return f"connecting timed out after {CONNECT_TIMEOUT:g} s"
    # requests raises a read timeout in the middle of a body as a ConnectionError around urllib3's error.
    if isinstance(exc, requests.Timeout) or (exc.args and isinstance(exc.args[0], ReadTimeoutError)):
        return f"timed out after {read_timeout:g} s without data"
    return str(exc) if isinstance(exc, _ServerError) else f"connection failed ({_reason(exc)})"


def _reason(exc: BaseException) -> str:
    """The innermost readable message of a requests/urllib3 error (they nest)."""
    while exc.args and isinstance(exc.args[0], BaseException):
        exc = exc.args[0]
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)


def mb(size: int | None) -> str:
    return "? MB" if size is None else f"{size / 1e6:.1f} MB"
