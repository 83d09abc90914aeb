"""The hub's checksums, checked: every weight file of a snapshot hashed once against the sha256 the hub gives for LFS
files (the git blob sha1 for others), a mismatching file removed and fetched again once, and a marker per commit
(`<cache>/hub-verified/models--owner--name/<commit>.json`, keyed on each blob's size and mtime) so a warm setup does
not hash 18 GB again."""

import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from idefics_cog.weights.base import ADAPTER_PICKLE, PICKLE_SUFFIXES, WeightsError
from idefics_cog.weights.hub_client import Hub

log = logging.getLogger("idefics_cog.weights.hub")

SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHA1 = re.compile(r"^[0-9a-f]{40}$")
MARKER_FORMAT = 1


def _weight_files(hub: Hub, snapshot: Path) -> list[Path]:
    """The weight files of a snapshot: its .safetensors, and an adapter's adapter_model.bin."""
    files = list(snapshot.rglob("*.safetensors"))
    if hub.with_pickle and (snapshot / ADAPTER_PICKLE).exists():
        files.append(snapshot / ADAPTER_PICKLE)
    return files


def require_safetensors(hub: Hub, snapshot: Path, commit: str) -> None:
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


def _tree(hub: Hub, commit: str) -> dict | None:
    """The repo's file listing at `commit`, as the hub gave it in this fetch (None offline, or for another commit)."""
    return hub.listing[1] if hub.listing and hub.listing[0] == commit else None


def verify(hub: Hub, snapshot: Path, commit: str) -> int:
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
            expected = expected_digest(file, (tree or {}).get(rel))
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
            actual = digest(file, expected[0])
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


def _write_marker(hub: Hub, path: Path, commit: str, verified: dict) -> None:
    write_marker(path, {"format": MARKER_FORMAT, "repo": hub.repo_id, "commit": commit, "files": verified}, hub.label)


def write_marker(path: Path, data: dict, label: str) -> None:
    """A record of what was verified, written whole or not at all. Best effort: without it (a read-only cache), the
    next setup only hashes the files again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(data))
    except OSError as exc:
        log.warning("%s: could not record the verification in %s (%s)", label, path, exc)


def expected_digest(file: Path, entry) -> tuple[str, str] | None:
    """("sha256", hex) for an LFS file, ("git-sha1", hex) for a file stored in git; None when unknown.

    From the hub's listing (`repo_info(files_metadata=True)`) when this fetch has it; else from the blob's name, which
    is the file's ETag in snapshot_download's layout: the sha256 of an LFS file (`X-Linked-Etag`), the git blob sha1
    of any other file.
    """
    lfs = getattr(entry, "lfs", None)
    if lfs is not None and lfs.sha256:
        return "sha256", lfs.sha256.lower()
    name = os.path.basename(os.path.realpath(file))
    if SHA256.match(name):
        return "sha256", name
    if entry is not None and getattr(entry, "blob_id", None):
        return "git-sha1", entry.blob_id.lower()
    if SHA1.match(name):
        return "git-sha1", name
    return None


def digest(file: Path, algorithm: str) -> str:
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


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
