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
and checksums first, then each is fetched by transfer.fetch_file, under the request's byte cap and total deadline
(snapshot_download has neither), into the request adapter's own cache folder.

The checksum checks are in checksums.py; the repo, its cache and the hub's environment in hub_client.py.
"""

import logging
import os
import shutil
import time
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_url

from idefics_cog.weights import checksums
from idefics_cog.weights.base import ADAPTER_PICKLE, UnreachableError, WeightsError
from idefics_cog.weights.checksums import require_safetensors, verify, write_atomically
from idefics_cog.weights.hub_client import COMMIT, Hub
from idefics_cog.weights.cancel import Cancel
from idefics_cog.weights.transfer import fetch_file

log = logging.getLogger(__name__)

STALE_PARTIAL_S = 600  # seconds untouched after which a partial download is a dead process's


def fetch_hub(repo_id: str, revision: str | None, cache_dir: Path, *, timeout: float | None = None,
              adapter: bool = False, hub: "Hub | None" = None) -> Path:
    """Return the snapshot directory of `repo_id` at `revision` (default branch when None), downloading it first.
    `adapter`: a LoRA adapter repo, whose adapter_model.bin is fetched too when it has no .safetensors.

    Raises WeightsError, naming the repo and revision, when it cannot be had: not found, unreachable hub and not
    cached, offline and not cached, pickled weights only, a file that fails verification twice.
    """
    started = time.monotonic()
    hub = hub or Hub(repo_id, revision, Path(cache_dir), timeout)
    before = _blob_states(hub.storage)
    _remove_stale_partials(hub.storage)
    with hub.errors():
        snapshot = hub.snapshot()
        if adapter and not (snapshot / "adapter_model.safetensors").exists():
            # PEFT's older format only: fetch adapter_model.bin too, for the weights-only loader (adapters.py).
            hub.with_pickle = True
            snapshot = hub.download(snapshot.name, local_files_only=not hub.online)
    commit = snapshot.name
    require_safetensors(hub, snapshot, commit)
    hashed = verify(hub, snapshot, commit)
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
                          deadline: float | None = None, cancel: Cancel | None = None) -> Path:
    """A hub adapter a request named, as `folder/<commit>/` holding only its adapter files. Without the operator's
    HF_TOKEN; refused before anything is downloaded when the repo's file metadata says the files add up to more
    than `max_bytes`; each file then fetched by transfer.fetch_file, so the cap and the deadline (a
    time.monotonic() value) hold on the bytes received, and checked against the hub's sha256 (git sha1 for a file
    not in LFS). snapshot_download is not used here: it has no total deadline. Offline, the commit last fetched."""
    folder = Path(folder)
    hub = Hub(repo_id, revision, folder, None)
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
                    fetch_file(url, staging / name, max_bytes=max_bytes - received, deadline=deadline, cancel=cancel)
                received += (staging / name).stat().st_size
                _check_request_file(hub, staging / name, files[name])
            staging.rename(snapshot)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    write_atomically(folder / CURRENT, info.sha)
    log.info("%s: adapter files of commit %s in %s", hub.label, info.sha, snapshot)
    return snapshot


def _check_request_file(hub: "Hub", file: Path, sibling) -> None:
    expected = checksums.expected_digest(file, sibling)
    if expected is None:
        raise WeightsError(f"Hugging Face repo {hub.label}: the hub gives no checksum for {file.name}; not used")
    actual = checksums.digest(file, expected[0])
    if actual != expected[1]:
        raise WeightsError(f"Hugging Face repo {hub.label}: {file.name} does not match the hub's checksum "
                           f"(expected {expected[1]}, got {actual}); not used")


def _cached_request_adapter(hub: "Hub", folder: Path) -> Path:
    try:
        snapshot = folder / (folder / CURRENT).read_text().strip()
    except OSError:
        snapshot = None
    if snapshot is None or not snapshot.is_dir():
        raise UnreachableError(f"Hugging Face repo {hub.label} is not in the cache ({folder}) and cannot be "
                               f"downloaded: HF_HUB_OFFLINE is set")
    return snapshot


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
