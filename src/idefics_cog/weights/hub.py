"""Hugging Face hub weight source: `owner/name[@revision]` to a local snapshot directory under `<cache>/hub`.

Built on `huggingface_hub.snapshot_download` (2.4.0), which keeps its own cache layout under `<cache>/hub`
(`models--owner--name/{refs,blobs,snapshots,trees}`), downloads each file to a process-unique temporary
`<blob>.<id>.incomplete` file renamed into place only when complete, checks each file's size against the size the
hub announced, resumes a transfer cut mid-file with a Range request from the last whole 10 MB chunk it wrote (up
to 5 times, within the same call), and locks each blob against parallel downloads. What it does not do, and this
module adds:

- It never checks a file's content against the sha256 the hub gives for LFS files (`X-Linked-Etag`, or the tree
  listing's `lfs.oid`): a download of the right length with wrong bytes lands in the cache as good. Every
  `.safetensors` file is hashed here once, after it was downloaded; a mismatching one is deleted and downloaded
  again once; a second mismatch is an error (the file is deleted, never returned). A small marker
  (`<cache>/hub-verified/models--owner--name/<commit>.json`) remembers what was verified, keyed on each blob's size
  and mtime, so a warm setup does not hash 18 GB again but a blob replaced or rewritten since is hashed again.
- Its repo-info request (branch or tag to commit) has no timeout (`timeout=None` on a client without default
  timeout), so a hub that accepts the connection and never answers would hang setup. The revision is probed here
  first with `HfApi.repo_info(timeout=...)` (`HF_HUB_ETAG_TIMEOUT` seconds, 10 by default, read at call time).
- It reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` once, when it is imported. Both are read here at every call and
  passed on (`endpoint=`, `local_files_only=True`), so a test or a Cog server subprocess can set them at any time.
- It no longer resumes a download interrupted by a killed process (the temporary file is process-unique since
  huggingface_hub PR #4228, and removed on any error it sees), but a SIGKILL leaves that file behind. Partial
  files untouched for 10 minutes (no live download goes that long without writing) are removed here.

Only safetensors weights and small config/tokenizer/processor files are fetched; pickled weights never are, except
an adapter repo's `adapter_model.bin` (`adapter=True`) when the repo has no .safetensors: adapters.py reads it with
torch's weights-only loader and converts it to safetensors. It is sha256-verified like a .safetensors file.

An adapter a request names (fetch_request_adapter) takes another way: its few files are listed with their sizes
and checksums first, then each is fetched by download.fetch_file, under the request's byte cap and total deadline
(snapshot_download has neither), into the request adapter's own cache folder.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import tqdm as hf_tqdm

from idefics_cog.weights.transfer import fetch_file
from idefics_cog.weights.base import ADAPTER_PICKLE, PICKLE_SUFFIXES, UnreachableError, WeightsError, env_flag

try:  # the tree listing snapshot_download caches per commit (`trees/<commit>.json`), with each file's lfs sha256
    from huggingface_hub._tree_cache import read_tree_cache
except ImportError:  # a later huggingface_hub: fall back on blob names, which are the sha256 of LFS files
    read_tree_cache = None

log = logging.getLogger(__name__)


class _TerminalOnlyBar(hf_tqdm):
    """snapshot_download's bars, shown on a terminal only (tqdm's `disable=None`), as its byte bars already are: its
    "Fetching N files" bar printed two lines into the server log at every start, even with everything cached.
    Off a terminal the "... fetched" line below says what was downloaded."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True if kwargs.get("disable") else None
        super().__init__(*args, **kwargs)

ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
IGNORE_PATTERNS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES]  # redundant with ALLOW_PATTERNS, on purpose
ADAPTER_ALLOW_PATTERNS = ALLOW_PATTERNS + [ADAPTER_PICKLE]
ADAPTER_IGNORE_PATTERNS = [pattern for pattern in IGNORE_PATTERNS if pattern != "*.bin"]
DEFAULT_TIMEOUT = 10.0
STALE_PARTIAL_S = 600
COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHA1 = re.compile(r"^[0-9a-f]{40}$")
MARKER_FORMAT = 1


def fetch_hub(repo_id: str, revision: str | None, cache_dir: Path, *, timeout: float | None = None,
              adapter: bool = False, hub: "_Hub | None" = None) -> Path:
    """Return the snapshot directory of `repo_id` at `revision` (default branch when None), downloading it first.
    `adapter`: a LoRA adapter repo, whose adapter_model.bin is fetched too when it has no .safetensors.

    Raises WeightsError, naming the repo and revision, when it cannot be had: not found, unreachable hub and not
    cached, offline and not cached, pickled weights only, a file that fails verification twice.
    """
    started = time.monotonic()
    hub = hub or _Hub(repo_id, revision, Path(cache_dir), timeout)
    before = _blob_states(hub.storage)
    _remove_stale_partials(hub.storage)
    with hub.errors():
        snapshot = hub.snapshot()
        if adapter and not (snapshot / "adapter_model.safetensors").exists():
            # PEFT's older format only: fetch adapter_model.bin too, for the weights-only loader (adapters.py).
            hub.with_pickle = True
            snapshot = hub.download(snapshot.name, local_files_only=not hub.online)
    commit = snapshot.name
    _require_safetensors(hub, snapshot, commit)
    hashed = _verify(hub, snapshot, commit)
    after = _blob_states(hub.storage)
    fetched = [name for name, state in after.items() if before.get(name) != state]
    fetched_bytes = sum(after[name][0] for name in fetched)
    log.info(
        "%s: commit %s, %d files, %d bytes (%s) fetched, %d bytes hashed, in %.1f s",
        hub.label, commit, len(fetched), fetched_bytes, _human(fetched_bytes), hashed, time.monotonic() - started,
    )
    return snapshot


REQUEST_FILES = ("adapter_config.json", "adapter_model.safetensors", ADAPTER_PICKLE)
CURRENT = "commit"  # in a request adapter's folder: the commit last fetched, for use offline


def fetch_request_adapter(repo_id: str, revision: str | None, folder: Path, max_bytes: int,
                          deadline: float | None = None) -> Path:
    """A hub adapter a request named, as `folder/<commit>/` holding only its adapter files. Without the operator's
    HF_TOKEN; refused before anything is downloaded when the repo's file metadata says the files add up to more
    than `max_bytes`; each file then fetched by download.fetch_file, so the cap and the deadline (a
    time.monotonic() value) hold on the bytes received, and checked against the hub's sha256 (git sha1 for a file
    not in LFS). snapshot_download is not used here: it has no total deadline. Offline, the commit last fetched."""
    folder = Path(folder)
    hub = _Hub(repo_id, revision, folder, None)
    if not hub.online:
        return _cached_request_adapter(hub, folder)
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
                    fetch_file(url, staging / name, max_bytes=max_bytes - received,
                               deadline=deadline if deadline is not None else float("inf"))
                received += (staging / name).stat().st_size
                _check_request_file(hub, staging / name, files[name])
            staging.rename(snapshot)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _write_atomically(folder / CURRENT, info.sha)
    log.info("%s: adapter files of commit %s in %s", hub.label, info.sha, snapshot)
    return snapshot


def _check_request_file(hub: "_Hub", file: Path, sibling) -> None:
    lfs = getattr(sibling, "lfs", None)
    expected = ("sha256", lfs.sha256.lower()) if lfs else ("git-sha1", (sibling.blob_id or "").lower())
    actual = _digest(file, expected[0])
    if actual != expected[1]:
        raise WeightsError(f"Hugging Face repo {hub.label}: {file.name} does not match the hub's checksum "
                           f"(expected {expected[1]}, got {actual}); not used")


def _cached_request_adapter(hub: "_Hub", folder: Path) -> Path:
    try:
        snapshot = folder / (folder / CURRENT).read_text().strip()
    except OSError:
        snapshot = None
    if snapshot is None or not snapshot.is_dir():
        raise UnreachableError(f"Hugging Face repo {hub.label} is not in the cache ({folder}) and cannot be "
                               f"downloaded: HF_HUB_OFFLINE is set")
    return snapshot


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class _Hub:
    """One fetch: the repo, where it is cached, and how to reach the hub (read from the environment now)."""

    def __init__(self, repo_id: str, revision: str | None, cache_dir: Path, timeout: float | None):
        self.repo_id, self.revision = repo_id, revision
        self.with_pickle = False  # also fetch (and verify) an adapter's adapter_model.bin
        self.token = None  # None: HF_TOKEN from the environment; False for a request's repo
        self.only: list[str] | None = None  # exactly these files (a request's adapter)
        self.label = f"{repo_id}@{revision or constants.DEFAULT_REVISION}"
        self.cache_dir = cache_dir / "hub"
        self.storage = self.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
        self.verified_dir = cache_dir / "hub-verified" / self.storage.name
        self.endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
        self.shown_endpoint = self.endpoint or constants.ENDPOINT
        if timeout is None:
            timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_TIMEOUT)
        self.timeout = timeout
        # huggingface_hub read HF_HUB_OFFLINE at import; it still blocks every request when it was set then.
        self.offline = env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE") or constants.is_offline_mode()
        self.online = not self.offline

    def download(self, revision: str | None, local_files_only: bool = False) -> Path:
        return Path(
            snapshot_download(
                self.repo_id,
                revision=revision,
                cache_dir=self.cache_dir,
                allow_patterns=self.only or (ADAPTER_ALLOW_PATTERNS if self.with_pickle else ALLOW_PATTERNS),
                ignore_patterns=ADAPTER_IGNORE_PATTERNS if self.with_pickle else IGNORE_PATTERNS,
                local_files_only=local_files_only or self.offline,
                endpoint=self.endpoint,
                etag_timeout=self.timeout,
                tqdm_class=_TerminalOnlyBar,
                token=self.token,
            )
        )

    def snapshot(self) -> Path:
        if self.offline:
            return self.cached(reason="HF_HUB_OFFLINE is set")
        # A commit sha that an earlier fetch completed and verified (its marker exists) is taken from the cache with
        # local_files_only=True: no request at all. On a warm cache snapshot_download makes none either for a full
        # sha (it skips repo_info, reads the tree listing it cached under trees/, and returns each file whose
        # snapshot link exists), so this is not about saving requests but about not depending on the hub: our own
        # probe below would otherwise cost one request, and a cold, unreachable hub makes snapshot_download retry
        # its tree listing for ~23 s. A snapshot that turns out incomplete is fetched online as usual.
        # A branch or tag is always resolved online (repo-info requests, no file download), since it may have
        # moved; the cache is the fallback when the hub cannot be used.
        if self.revision and COMMIT.match(self.revision) and self.marker_path(self.revision).exists():
            try:
                return self.download(self.revision, local_files_only=True)
            except LocalEntryNotFoundError:
                pass  # incomplete or gone: fetch what is missing
        try:
            HfApi(endpoint=self.endpoint, token=self.token).repo_info(
                self.repo_id, revision=self.revision, timeout=self.timeout
            )
        except RevisionNotFoundError:
            raise  # the hub answered: no such revision
        except (httpx2.TransportError, OfflineModeIsEnabled, HfHubHTTPError) as exc:
            # Unreachable, timed out, down, or the repo is not found (or private): use the cache when it has the
            # snapshot (as snapshot_download itself does for these errors), else say why it could not be fetched.
            self.online = False
            reason = _describe(exc, self, timeout=self.timeout)
            snapshot = self.cached(reason=reason, cause=exc)
            log.warning("%s: %s; using the cached snapshot %s", self.label, reason, snapshot.name)
            return snapshot
        return self.download(self.revision)

    def cached(self, reason: str, cause: Exception | None = None) -> Path:
        try:
            return self.download(self.revision, local_files_only=True)
        except LocalEntryNotFoundError as exc:
            incomplete = "incomplete" if isinstance(exc, IncompleteSnapshotError) else "not"
            raise UnreachableError(
                f"Hugging Face repo {self.label} is {incomplete} in the cache ({self.cache_dir}) and cannot be "
                f"downloaded: {reason}"
            ) from (cause or exc)

    def marker_path(self, commit: str) -> Path:
        return self.verified_dir / f"{commit}.json"

    @contextmanager
    def errors(self):
        """Turn huggingface_hub and network errors into a WeightsError naming the repo and the problem."""
        try:
            yield
        except WeightsError:
            raise
        except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
            raise WeightsError(f"Hugging Face repo {self.label}: {_describe(exc, self)}") from exc


def _describe(exc: Exception, hub: _Hub, timeout: float | None = None) -> str:
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {hub.revision!r} not found in {hub.repo_id} on {hub.shown_endpoint}"
    if isinstance(exc, GatedRepoError):
        return f"the repo is gated on {hub.shown_endpoint}: accept its terms and set HF_TOKEN"
    status = getattr(getattr(exc, "response", None), "status_code", "error")
    if isinstance(exc, RepositoryNotFoundError):
        return f"repo not found on {hub.shown_endpoint} (HTTP {status}); check the id, or set HF_TOKEN if it is private"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"a file listed in the repo is missing on {hub.shown_endpoint} ({exc.response.url})"
    if isinstance(exc, HfHubHTTPError):
        return f"the hub at {hub.shown_endpoint} answered HTTP {status} ({(str(exc).strip().splitlines() or [''])[0]})"
    if isinstance(exc, httpx2.TimeoutException):
        within = f"within {timeout:g} s" if timeout is not None else "in time"
        return f"the hub at {hub.shown_endpoint} did not answer {within} ({type(exc).__name__})"
    if isinstance(exc, httpx2.TransportError):
        return f"the hub at {hub.shown_endpoint} could not be reached ({type(exc).__name__}: {exc})"
    if isinstance(exc, OfflineModeIsEnabled):
        return "offline mode is enabled (HF_HUB_OFFLINE)"
    if isinstance(exc, LocalEntryNotFoundError):
        return f"not (completely) in the cache {hub.cache_dir} and the hub cannot be used ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _weight_files(hub: _Hub, snapshot: Path) -> list[Path]:
    """The weight files of a snapshot: its .safetensors, and an adapter's adapter_model.bin."""
    files = list(snapshot.rglob("*.safetensors"))
    if hub.with_pickle and (snapshot / ADAPTER_PICKLE).exists():
        files.append(snapshot / ADAPTER_PICKLE)
    return files


def _require_safetensors(hub: _Hub, snapshot: Path, commit: str) -> None:
    if _weight_files(hub, snapshot):
        return
    listed = sorted(_tree(hub, commit) or {})
    pickled = [path for path in listed if path.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise WeightsError(
            f"Hugging Face repo {hub.label} offers only pickled weights ({', '.join(pickled)}), which are never "
            f"downloaded or loaded (they can run code); use a repo or revision with .safetensors weights"
        )
    raise WeightsError(f"Hugging Face repo {hub.label} has no .safetensors weights (commit {commit})")


def _tree(hub: _Hub, commit: str) -> dict | None:
    """The repo's file listing at `commit`, as snapshot_download cached it (None when it did not)."""
    if read_tree_cache is None:
        return None
    try:
        return read_tree_cache(str(hub.storage), commit)
    except Exception:  # a private helper: never let it break a fetch
        return None


def _verify(hub: _Hub, snapshot: Path, commit: str) -> int:
    """Hash every weight file (_weight_files) not verified before; fetch a mismatching one again once.
    Returns bytes hashed."""
    marker_path = hub.marker_path(commit)
    try:
        verified = json.loads(marker_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        verified = {}
    tree = _tree(hub, commit)
    files = sorted(path.relative_to(snapshot).as_posix() for path in _weight_files(hub, snapshot))
    hashed = 0

    def check(paths: list[str]) -> list[tuple[str, str, str]]:
        nonlocal hashed
        bad = []
        for rel in paths:
            file = snapshot / rel
            expected = _expected_digest(file, (tree or {}).get(rel))
            if expected is None:
                log.warning("%s: no checksum known for %s; not verified", hub.label, rel)
                continue
            if not file.exists():
                bad.append((rel, expected[1], "missing"))
                continue
            state = os.stat(file)
            entry = verified.get(rel) or {}
            if entry.get("digest") == expected[1] and [entry.get("size"), entry.get("mtime_ns")] == [
                state.st_size,
                state.st_mtime_ns,
            ]:
                continue
            actual = _digest(file, expected[0])
            hashed += state.st_size
            if actual == expected[1]:
                verified[rel] = {"algorithm": expected[0], "digest": actual, "size": state.st_size,
                                 "mtime_ns": state.st_mtime_ns}
            else:
                verified.pop(rel, None)
                _remove(file)
                bad.append((rel, expected[1], actual))
        return bad

    started = time.monotonic()
    bad = check(files)
    if bad and hub.online:
        log.warning(
            "%s: %s did not match the hub's checksum; removed, downloading again",
            hub.label, ", ".join(rel for rel, _, _ in bad),
        )
        with hub.errors():
            hub.download(commit)  # a commit sha: no repo-info request; only the removed files are fetched
        bad = check([rel for rel, _, _ in bad])
    _write_marker(hub, marker_path, commit, verified)
    if bad:
        rel, expected, actual = bad[0]
        again = "after downloading it twice" if hub.online else "in the cache (offline: not downloaded again)"
        raise WeightsError(
            f"Hugging Face repo {hub.label}: {rel} does not match the hub's checksum {again} "
            f"(expected {expected}, got {actual}); the file was removed"
        )
    if hashed:
        log.info("%s: verified %d bytes of safetensors in %.1f s", hub.label, hashed, time.monotonic() - started)
    return hashed


def _write_marker(hub: _Hub, path: Path, commit: str, verified: dict) -> None:
    """Best effort: without it (a read-only cache), the next setup only hashes the files again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json.dumps({"format": MARKER_FORMAT, "repo": hub.repo_id, "commit": commit,
                                            "files": verified}))
    except OSError as exc:
        log.warning("%s: could not record the verification in %s (%s)", hub.label, path, exc)


def _expected_digest(file: Path, entry) -> tuple[str, str] | None:
    """("sha256", hex) for an LFS file, ("git-sha1", hex) for a file stored in git; None when unknown.

    From the tree listing when cached; else from the blob's name, which is the file's ETag in snapshot_download's
    layout: the sha256 of an LFS file (`X-Linked-Etag`), the git blob sha1 of any other file.
    """
    if entry is not None and getattr(entry, "lfs_sha256", None):
        return "sha256", entry.lfs_sha256.lower()
    name = os.path.basename(os.path.realpath(file))
    if SHA256.match(name):
        return "sha256", name
    if entry is not None and getattr(entry, "blob_id", None):
        return "git-sha1", entry.blob_id.lower()
    if SHA1.match(name):
        return "git-sha1", name
    return None


def _digest(file: Path, algorithm: str) -> str:
    with open(file, "rb") as stream:
        if algorithm == "sha256":
            return hashlib.file_digest(stream, "sha256").hexdigest()
        digest = hashlib.sha1(b"blob %d\0" % os.fstat(stream.fileno()).st_size)  # git's blob id
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
        return digest.hexdigest()


def _remove(file: Path) -> None:
    """Remove a snapshot file and the blob it points to (a bad blob must not serve another snapshot either)."""
    blob = Path(os.path.realpath(file))
    file.unlink(missing_ok=True)
    if blob != file.absolute():
        blob.unlink(missing_ok=True)


def _blob_states(storage: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of each complete blob: new or changed ones after a fetch were downloaded by it."""
    states = {}
    try:
        entries = list(os.scandir(storage / "blobs"))
    except OSError:
        return states
    for entry in entries:
        if entry.name.endswith(".incomplete"):
            continue
        try:
            state = entry.stat()
        except OSError:
            continue
        states[entry.name] = (state.st_size, state.st_mtime_ns)
    return states


def _remove_stale_partials(storage: Path) -> None:
    now = time.time()
    for partial in (storage / "blobs").glob("*.incomplete"):
        try:
            if now - partial.stat().st_mtime > STALE_PARTIAL_S:
                size = partial.stat().st_size
                partial.unlink()
                log.info("removed %s, a partial download left by an interrupted run (%d bytes)", partial, size)
        except OSError:
            continue


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"
