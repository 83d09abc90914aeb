"""Custom adapters fetched and checked before the model sees them: a request's source by url_guard's rules, under a
byte cap, a deadline and a cancel, on a bounded pool; kept in `<weights folder>/adapters/` within a budget."""

import hashlib
import logging
import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import NamedTuple

from peft import LoraConfig

from idefics_cog.adapters.checks import check_adapter, check_values, with_safetensors
from idefics_cog.config import MAX_ADAPTER_RANK
from idefics_cog.errors import AdapterError, InputError, WeightsError, shorten
from idefics_cog.weights.archive import fetch_archive
from idefics_cog.weights.download import resolve
from idefics_cog.weights.fetch_pool import FetchPool, Recent, Waiter
from idefics_cog.weights.hub import fetch_request_adapter
from idefics_cog.weights.stream import Cancel, Cancelled
from idefics_cog.weights.url_guard import check_request_source, guarded_session

log = logging.getLogger(__name__)

FAILURE_MEMORY_S = 60.0  # a source that failed is refused with the same message for this long
REMEMBERED_SOURCES = 256  # sources remembered as fetched, and as failed (each map)
MAX_MESSAGE_CHARS = 600  # of an error given to the requester


class Fetched(NamedTuple):
    path: Path  # the adapter's checked files
    config: LoraConfig  # to load them with


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


class AdapterDownloads:
    """Adapters fetched and checked against the base model's layers (`layers`: checks.layer_shapes)."""

    def __init__(self, layers: dict, weights_dir: Path, budget_bytes: int = 4 << 30, max_adapter_bytes: int = 1 << 30,
                 download_seconds: float = 300.0, max_rank: int = MAX_ADAPTER_RANK, fetch_threads: int = 4):
        self.layers, self.weights_dir = layers, Path(weights_dir)
        self.folder = self.weights_dir / "adapters"
        self.budget_bytes, self.max_adapter_bytes = budget_bytes, max_adapter_bytes
        self.download_seconds, self.max_rank = download_seconds, max_rank
        self.fetches = FetchPool(fetch_threads, "adapter-fetch")
        self.fetched = Recent(REMEMBERED_SOURCES)  # source -> its Fetched
        self.failures = Recent(REMEMBERED_SOURCES, FAILURE_MEMORY_S)  # source -> the message it failed with
        self._lock = threading.Lock()
        self._busy: set[Path] = set()  # adapter folders being filled: never trimmed
        self._trim_lock = threading.Lock()

    def operators(self, source: str) -> Fetched:
        return self.checked(resolve(source, self.weights_dir, adapter=True))

    def checked(self, path: Path, folder: Path | None = None) -> Fetched:
        """Every check of the adapter at `path` (an adapter_model.bin converted first, under `folder`): on a fetch
        thread or in setup, never on the torch thread (a whole adapter's values are read)."""
        path = with_safetensors(path, folder or self.weights_dir)
        config = check_adapter(path, self.layers, self.max_rank)
        check_values(path)
        return Fetched(path, config)

    def fetch(self, source: str, allow_local: bool = False) -> Path:
        return self.start_fetch(source, allow_local).result().path

    def start_fetch(self, source: str, allow_local: bool = False) -> Waiter:
        """Download and checks on the fetch pool, where a slow source delays its own request only; a source that failed
        is refused with the same message for FAILURE_MEMORY_S seconds. `allow_local`: the operator's tools only."""
        found, failed = self.fetched.get(source), self.failures.get(source)
        if failed is not None or (found is not None and found.path.is_dir()):
            done: Future = Future()
            done.set_exception(InputError(failed)) if failed is not None else done.set_result(found)
            return Waiter(done, lambda: None)
        return self.fetches.join((source, allow_local), lambda cancel: self._fetch_checked(source, allow_local, cancel))

    def refuse(self, source: str, problem: str) -> str:
        """Remember `source` as failed with `problem` (a load that failed); returns the requester's message."""
        message = self.message(problem, source)
        self.fetched.pop(source)
        self.failures.put(source, message)
        return message

    def message(self, problem: str, source: str) -> str:
        """An error for the requester: the source shortened, without the server's folders, of bounded length."""
        for folder in {str(self.weights_dir), str(self.weights_dir.resolve())}:
            problem = problem.replace(folder, "<cache>")
        for shown in {source, source.partition("#")[0]}:
            problem = problem.replace(shown, shorten(shown))
        return shorten(f"lora_weights: {problem}", MAX_MESSAGE_CHARS)

    def _fetch_checked(self, source: str, allow_local: bool, cancel: Cancel) -> Fetched:
        started = time.perf_counter()
        deadline = time.monotonic() + self.download_seconds  # from its start: waiting for a thread is not its fault
        try:
            fetched = self._fetch(source, allow_local, deadline, cancel)
        except Cancelled:  # not the source's fault: not remembered
            raise
        except (WeightsError, AdapterError) as exc:
            message = self.message(str(exc), source)
        except Exception:  # a fault met on a stranger's files: the details (server paths) go to the log only
            log.exception("adapter %s could not be fetched", shorten(source))
            message = self.message("it could not be used (the server's log says why)", source)
        else:
            self.fetched.put(source, fetched)
            self.failures.pop(source)
            log.info("adapter %s fetched and checked in %.1f s", shorten(source), time.perf_counter() - started)
            return fetched
        self.failures.put(source, message)
        raise InputError(message)

    def _fetch(self, source: str, operator: bool, deadline: float, cancel: Cancel) -> Fetched:
        """`operator`: the settings' freedom (local folders, any URL); a folder this fetch made goes if it fails."""
        if operator and Path(source).expanduser().is_dir():
            return self.checked(Path(source).expanduser())
        kind = "operator" if operator else check_request_source(source)
        folder = self.folder / source_key(source)
        new = not folder.exists()
        with self._lock:
            self._busy.add(folder)
        try:
            return self.checked(self._download(source, kind, folder, deadline, cancel), folder)
        except BaseException:
            if new:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            with self._lock:
                self._busy.discard(folder)

    def _download(self, source: str, kind: str, folder: Path, deadline: float, cancel: Cancel) -> Path:
        try:
            if kind == "url":
                path = fetch_archive(source, folder, max_bytes=self.max_adapter_bytes, deadline=deadline,
                                     session=guarded_session(), cancel=cancel)
            elif kind == "hub":
                repo_id, _, revision = source.partition("@")
                path = fetch_request_adapter(repo_id, revision or None, folder, self.max_adapter_bytes, deadline,
                                             cancel)
            else:
                path = resolve(source, folder, max_bytes=self.max_adapter_bytes, adapter=True)
            if directory_bytes(folder) > self.max_adapter_bytes:  # a hub repo offline is only measured here
                shutil.rmtree(folder, ignore_errors=True)
                raise AdapterError(f"{source} is over the limit of {self.max_adapter_bytes} bytes per adapter "
                                   f"(IDEFICS_MAX_ADAPTER_BYTES)")
        finally:
            if folder.is_dir():
                (folder / ".last_used").touch()
                self.trim(keep=folder)  # partial downloads left by a failure count too
        return path

    def trim(self, keep: Path) -> None:
        """Delete the least recently used adapter folders (never `keep`, nor one being filled) to fit the budget."""
        with self._trim_lock:
            with self._lock:
                busy = set(self._busy)
            folders = [p for p in self.folder.iterdir() if p.is_dir() and p != keep and p not in busy]
            folders.sort(key=lambda p: (p / ".last_used").stat().st_mtime if (p / ".last_used").exists() else 0)
            total = sum(directory_bytes(p) for p in folders) + directory_bytes(keep)
            while folders and total > self.budget_bytes:
                oldest = folders.pop(0)
                total -= directory_bytes(oldest)
                shutil.rmtree(oldest, ignore_errors=True)
                log.info("adapter downloads: removed %s to stay under %d bytes", oldest.name, self.budget_bytes)
