"""Hub ids `owner/name[@revision]` to snapshot folders through huggingface_hub, plus what it lacks: weight files checked
against the hub's sha256, a timeout on the repo-info request, the environment read at each call. A request's adapter
is listed first, then streamed under its byte cap and deadline."""

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import tqdm as hf_tqdm

from idefics_cog.errors import UnreachableError, WeightsError
from idefics_cog.weights.source import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS, PICKLE_SUFFIXES, env_flag
from idefics_cog.weights.stream import Cancel, fetch_file

log = logging.getLogger(__name__)

ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
IGNORE_PATTERNS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES]  # redundant with ALLOW_PATTERNS, on purpose
ADAPTER_ALLOW_PATTERNS = ALLOW_PATTERNS + [ADAPTER_PICKLE]
ADAPTER_IGNORE_PATTERNS = [pattern for pattern in IGNORE_PATTERNS if pattern != "*.bin"]
DEFAULT_TIMEOUT = 10.0  # seconds, when HF_HUB_ETAG_TIMEOUT is not set
COMMIT, SHA256 = re.compile(r"^[0-9a-f]{40}$"), re.compile(r"^[0-9a-f]{64}$")
STALE_PARTIAL_S = 600  # seconds untouched after which a partial download is a dead process's
REQUEST_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_PICKLE)
CURRENT = "commit"  # in a request adapter's folder: the commit last fetched, for use offline


class TerminalOnlyBar(hf_tqdm):
    """snapshot_download's bars on a terminal only: its "Fetching N files" bar wrote two lines into the server log
    at every start. Off a terminal the "... fetched" line says what was downloaded."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True if kwargs.get("disable") else None
        super().__init__(*args, **kwargs)


class Hub:
    """One repo at one revision, where it is stored, and how to reach the hub (read from the environment now)."""

    def __init__(self, repo_id: str, revision: str | None, weights_dir: Path):
        self.repo_id, self.revision = repo_id, revision
        self.with_pickle = False  # also fetch (and check) an adapter's adapter_model.bin
        self.listing: tuple[str, dict] | None = None  # (commit, {path: RepoSibling}): the hub's sizes and checksums
        self.label = f"{repo_id}@{revision or constants.DEFAULT_REVISION}"
        self.hub_dir = weights_dir / "hub"
        self.storage = self.hub_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
        self.checked_dir = weights_dir / "hub-verified" / self.storage.name
        self.endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
        self.timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_TIMEOUT)
        # huggingface_hub read HF_HUB_OFFLINE at import; it still blocks every request when it was set then.
        self.offline = env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE") or constants.is_offline_mode()
        self.online = not self.offline

    def download(self, revision: str | None, local_files_only: bool = False) -> Path:
        return Path(snapshot_download(
            self.repo_id, revision=revision, cache_dir=self.hub_dir, endpoint=self.endpoint, etag_timeout=self.timeout,
            allow_patterns=ADAPTER_ALLOW_PATTERNS if self.with_pickle else ALLOW_PATTERNS,
            ignore_patterns=ADAPTER_IGNORE_PATTERNS if self.with_pickle else IGNORE_PATTERNS,
            local_files_only=local_files_only or self.offline, tqdm_class=TerminalOnlyBar))

    def snapshot(self) -> Path:
        if self.offline:
            return self.stored(reason="HF_HUB_OFFLINE is set")
        # A commit checked before is taken without a request: a cold, unreachable hub would make snapshot_download
        # retry for ~23 s. A branch or tag may have moved: always resolved online, the stored copy as fallback.
        if self.revision and COMMIT.match(self.revision) and self.record_path(self.revision).exists():
            try:
                return self.download(self.revision, local_files_only=True)
            except LocalEntryNotFoundError:
                pass  # incomplete or gone: fetch what is missing
        try:  # snapshot_download's own repo-info request has no timeout: a silent hub would hang setup
            info = HfApi(endpoint=self.endpoint).repo_info(self.repo_id, revision=self.revision,
                                                           timeout=self.timeout, files_metadata=True)
            self.listing = (info.sha, {sibling.rfilename: sibling for sibling in info.siblings or []})
        except RevisionNotFoundError:
            raise  # the hub answered: no such revision
        except (httpx2.TransportError, OfflineModeIsEnabled, HfHubHTTPError) as exc:
            self.online = False  # unreachable, down, or not found: the stored snapshot if there is one
            reason = describe(exc, self)
            snapshot = self.stored(reason=reason, cause=exc)
            log.warning("%s: %s; using the stored snapshot %s", self.label, reason, snapshot.name)
            return snapshot
        return self.download(self.revision)

    def stored(self, reason: str, cause: Exception | None = None) -> Path:
        try:
            return self.download(self.revision, local_files_only=True)
        except LocalEntryNotFoundError as exc:
            incomplete = "incomplete" if isinstance(exc, IncompleteSnapshotError) else "not"
            raise UnreachableError(f"Hugging Face repo {self.label} is {incomplete} in the cache ({self.hub_dir}) "
                                   f"and cannot be downloaded: {reason}") from (cause or exc)

    def record_path(self, commit: str) -> Path:
        return self.checked_dir / f"{commit}.json"

    @contextmanager
    def errors(self):  # huggingface_hub's and the network's errors as a WeightsError naming the repo
        try:
            yield
        except WeightsError:
            raise
        except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
            raise WeightsError(f"Hugging Face repo {self.label}: {describe(exc, self)}") from exc


def describe(exc: Exception, hub: Hub) -> str:
    where, status = hub.endpoint or constants.ENDPOINT, getattr(getattr(exc, "response", None), "status_code", "error")
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {hub.revision!r} not found in {hub.repo_id} on {where}"
    if isinstance(exc, RepositoryNotFoundError):  # GatedRepoError too
        return (f"repo not found on {where} (HTTP {status}); check the id, or set HF_TOKEN if it is private or "
                f"gated (and accept its terms)")
    if isinstance(exc, HfHubHTTPError):
        return f"the hub at {where} answered HTTP {status} ({(str(exc).strip().splitlines() or [''])[0]})"
    if isinstance(exc, httpx2.TimeoutException):
        return f"the hub at {where} did not answer within {hub.timeout:g} s ({type(exc).__name__})"
    if isinstance(exc, httpx2.TransportError):
        return f"the hub at {where} could not be reached ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


def fetch_hub(repo_id: str, revision: str | None, weights_dir: Path, *, adapter: bool = False) -> Path:
    """The snapshot folder of `repo_id` at `revision` (None: the default branch), downloaded first if needed.
    `adapter`: a LoRA adapter repo, whose adapter_model.bin is fetched too when it has no .safetensors."""
    started = time.monotonic()
    hub = Hub(repo_id, revision, Path(weights_dir))
    before = _blob_states(hub.storage, remove_partial_older_than=STALE_PARTIAL_S)
    with hub.errors():
        snapshot = hub.snapshot()
        if adapter and not (snapshot / ADAPTER_WEIGHTS).exists():
            hub.with_pickle = True  # PEFT's older format only: for the weights-only loader (adapters/checks.py)
            snapshot = hub.download(snapshot.name, local_files_only=not hub.online)
    commit = snapshot.name
    if not _weight_files(hub, snapshot):
        pickled = [path for path in sorted(_listing(hub, commit) or {}) if path.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise WeightsError(f"Hugging Face repo {hub.label} offers only pickled weights ({', '.join(pickled)}), "
                               f"which are never downloaded or loaded (they can run code); use a repo or revision "
                               f"with .safetensors weights")
        raise WeightsError(f"Hugging Face repo {hub.label} has no .safetensors weights (commit {commit})")
    hashed = check_hub_checksums(hub, snapshot, commit)
    after = _blob_states(hub.storage)
    fetched = [name for name, state in after.items() if before.get(name) != state]
    size = sum(after[name][0] for name in fetched)
    log.info("%s: commit %s, %d files, %d bytes (%.1f MB) fetched, %d bytes hashed, in %.1f s", hub.label, commit,
             len(fetched), size, size / 1e6, hashed, time.monotonic() - started)
    return snapshot


def _weight_files(hub: Hub, snapshot: Path) -> list[Path]:
    files = list(snapshot.rglob("*.safetensors"))
    return files + [snapshot / ADAPTER_PICKLE] if hub.with_pickle and (snapshot / ADAPTER_PICKLE).exists() else files


def _listing(hub: Hub, commit: str) -> dict | None:
    """The repo's files at `commit`, as the hub listed them in this fetch (None offline, or for another commit)."""
    return hub.listing[1] if hub.listing and hub.listing[0] == commit else None


def check_hub_checksums(hub: Hub, snapshot: Path, commit: str) -> int:
    """Hash each weight file the record does not vouch for against the hub's checksum (huggingface_hub checks sizes
    only); a mismatching one is removed and fetched again once. Returns the bytes hashed."""
    record = CheckedFiles(hub.record_path(commit), repo=hub.repo_id, commit=commit)
    listing = _listing(hub, commit) or {}
    hashed = 0

    def check(paths: list[str]) -> list[tuple[str, str, str]]:
        nonlocal hashed
        bad = []
        for rel in paths:
            file = snapshot / rel
            expected = expected_digest(file, listing.get(rel))
            if expected is None:
                log.warning("%s: no checksum known for %s; not checked", hub.label, rel)
            elif not file.exists():
                bad.append((rel, expected[1], "missing"))
            elif not record.vouches(rel, expected[1], state := os.stat(file)):
                actual = digest(file, expected[0])
                hashed += state.st_size
                if actual == expected[1]:
                    record.add(rel, expected[1], state)
                    continue
                record.files.pop(rel, None)
                blob = Path(os.path.realpath(file))  # a bad blob must not serve another snapshot either
                file.unlink(missing_ok=True)
                blob.unlink(missing_ok=True)
                bad.append((rel, expected[1], actual))
        return bad

    bad = check(sorted(path.relative_to(snapshot).as_posix() for path in _weight_files(hub, snapshot)))
    if bad and hub.online:
        log.warning("%s: %s did not match the hub's checksum; removed, downloading again", hub.label,
                    ", ".join(rel for rel, _, _ in bad))
        with hub.errors():
            hub.download(commit)  # a commit sha: no repo-info request; only the removed files are fetched
        bad = check([rel for rel, _, _ in bad])
    record.save()
    if bad:
        rel, expected, actual = bad[0]
        again = "after downloading it twice" if hub.online else "in the cache (offline: not downloaded again)"
        raise WeightsError(f"Hugging Face repo {hub.label}: {rel} does not match the hub's checksum {again} "
                           f"(expected {expected}, got {actual}); the file was removed")
    return hashed


def expected_digest(file: Path, entry) -> tuple[str, str] | None:
    """("sha256", hex) for an LFS file, ("git-sha1", hex) for a file in git, None when unknown: from the hub's
    listing when this fetch has it, else from the blob's name (snapshot_download names a blob after its ETag)."""
    lfs = getattr(entry, "lfs", None)
    if lfs is not None and lfs.sha256:
        return "sha256", lfs.sha256.lower()
    name = os.path.basename(os.path.realpath(file))
    if SHA256.match(name):
        return "sha256", name
    if entry is not None and getattr(entry, "blob_id", None):
        return "git-sha1", entry.blob_id.lower()
    return ("git-sha1", name) if COMMIT.match(name) else None


def digest(file: Path, algorithm: str = "sha256") -> str:
    with open(file, "rb") as stream:
        if algorithm == "sha256":
            return hashlib.file_digest(stream, "sha256").hexdigest()
        found = hashlib.sha1(b"blob %d\0" % os.fstat(stream.fileno()).st_size)  # git's blob id
        while chunk := stream.read(8 << 20):
            found.update(chunk)
        return found.hexdigest()


class CheckedFiles:
    """A record of the files of one set hashed before, keyed on size and mtime, so that a warm start hashes only what
    changed; `identity` must match for it to count. Best effort: without it the next start only hashes again."""

    def __init__(self, path: Path, **identity):
        self.path, self.identity = path, identity
        try:
            data = json.loads(path.read_text())
            same = all(data.get(key) == value for key, value in identity.items())
            self.files: dict = dict(data["files"]) if same else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.files = {}

    def vouches(self, rel: str, digest: str, state: os.stat_result) -> bool:
        return self.files.get(rel) == {"digest": digest, "size": state.st_size, "mtime_ns": state.st_mtime_ns}

    def add(self, rel: str, digest: str, state: os.stat_result) -> None:
        self.files[rel] = {"digest": digest, "size": state.st_size, "mtime_ns": state.st_mtime_ns}

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps({**self.identity, "files": self.files}))
        except OSError as exc:
            log.warning("could not record the files checked in %s (%s)", self.path, exc)


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def fetch_request_adapter(repo_id: str, revision: str | None, folder: Path, max_bytes: int,
                          deadline: float | None = None, cancel: Cancel | None = None) -> Path:
    """`folder/<commit>/` with the two adapter files of a request's hub adapter, fetched without the operator's
    HF_TOKEN, refused when the listing puts them over `max_bytes`, streamed under the cap and the deadline (which
    snapshot_download lacks), checked against the hub's checksums. Offline: the commit last fetched."""
    folder = Path(folder)
    hub = Hub(repo_id, revision, folder)
    if not hub.online:
        current = folder / CURRENT
        snapshot = folder / current.read_text().strip() if current.is_file() else None
        if snapshot is None or not snapshot.is_dir():
            raise UnreachableError(f"Hugging Face repo {hub.label} is not in the cache ({folder}) and cannot be "
                                   f"downloaded: HF_HUB_OFFLINE is set")
        return snapshot
    with hub.errors():
        info = HfApi(endpoint=hub.endpoint, token=False).model_info(  # token=False: never the operator's repos
            repo_id, revision=revision, files_metadata=True, timeout=hub.timeout)
    files = {sibling.rfilename: sibling for sibling in info.siblings or []}
    config, weights = REQUEST_FILES[0], next((name for name in REQUEST_FILES[1:] if name in files), None)
    missing = [name for name, found in ((config, config in files), (REQUEST_FILES[1], weights)) if not found]
    if missing:
        raise WeightsError(f"Hugging Face repo {hub.label} has no {' and '.join(missing)} (a PEFT LoRA adapter has "
                           f"adapter_config.json and adapter_model.safetensors)")
    wanted = [config, weights]
    total = sum(files[name].size or 0 for name in wanted)
    if total > max_bytes:
        raise WeightsError(f"Hugging Face repo {hub.label}: its adapter files ({', '.join(wanted)}) are {total} "
                           f"bytes, over the limit of {max_bytes} bytes (IDEFICS_MAX_ADAPTER_BYTES); not downloaded")
    if not COMMIT.match(info.sha or ""):
        raise WeightsError(f"Hugging Face repo {hub.label}: the hub gave no commit sha ({info.sha!r})")
    snapshot = folder / info.sha
    if not snapshot.is_dir():
        staging = folder / f"{info.sha}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            received = 0
            for name in wanted:
                url = hf_hub_url(repo_id, name, revision=info.sha, endpoint=hub.endpoint)
                with hub.errors():
                    fetch_file(url, staging / name, max_bytes=max_bytes - received, deadline=deadline, cancel=cancel)
                received += (staging / name).stat().st_size
                expected = expected_digest(staging / name, files[name])
                if expected is None:
                    raise WeightsError(f"Hugging Face repo {hub.label}: the hub gives no checksum for {name}; not used")
                if (actual := digest(staging / name, expected[0])) != expected[1]:
                    raise WeightsError(f"Hugging Face repo {hub.label}: {name} does not match the hub's checksum "
                                       f"(expected {expected[1]}, got {actual}); not used")
            staging.rename(snapshot)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    write_atomically(folder / CURRENT, info.sha)
    log.info("%s: adapter files of commit %s in %s", hub.label, info.sha, snapshot)
    return snapshot


def _blob_states(storage: Path, remove_partial_older_than: float | None = None) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of each complete blob, to tell what a fetch downloaded; optionally removing the partial files
    that a SIGKILLed snapshot_download leaves."""
    states = {}
    for blob in (storage / "blobs").iterdir() if (storage / "blobs").is_dir() else ():
        with suppress(OSError):
            state = blob.stat()
            if not blob.name.endswith(".incomplete"):
                states[blob.name] = (state.st_size, state.st_mtime_ns)
            elif remove_partial_older_than is not None and time.time() - state.st_mtime > remove_partial_older_than:
                blob.unlink()
                log.info("removed %s, a partial download left by an interrupted run", blob)
    return states
