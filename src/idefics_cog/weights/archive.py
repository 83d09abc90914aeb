"""Archive URLs (.tar, .tar.gz/.tgz or .zip, optionally ending in `#sha256=<hex>`): downloaded once by `pget` when it is
on PATH (cog.yaml installs it) or one streamed GET, checked against the sha256, extracted safely into
`<weights folder>/archives/<key>/`, whose marker file is written last; a `<key>.guard` file makes one process fetch."""

import hashlib
import json
import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import requests
from filelock import FileLock

from idefics_cog.errors import UnreachableError, WeightsError
from idefics_cog.weights.safe_extract import extract_archive
from idefics_cog.weights.source import offline
from idefics_cog.weights.stream import READ_TIMEOUT, RETRIES, RETRY_WAIT, Cancel, fetch_file, mb

log = logging.getLogger(__name__)

MARKER = ".idefics-cog-archive.json"
SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
FRAGMENT = re.compile(r"^sha256=([0-9a-fA-F]{64})$")


@dataclass(frozen=True)
class ArchiveEntry:
    """Where the archive of one URL lives in the weights folder."""

    url: str  # without its fragment
    sha256: str | None  # expected, from `#sha256=`
    key: str
    folder: Path
    part: Path
    guard: Path

    @classmethod
    def of(cls, url: str, weights_dir: Path) -> "ArchiveEntry":
        url, _, fragment = url.partition("#")
        match = FRAGMENT.match(fragment)
        if fragment and not match:
            raise WeightsError(f"{url}: the URL fragment must be sha256=<64 hex digits>, got {fragment!r}")
        key, archives = entry_key(url), Path(weights_dir) / "archives"
        return cls(url, match[1].lower() if match else None, key, archives / key, archives / f"{key}.part",
                   archives / f"{key}.guard")

    def lookup(self) -> Path | None:
        """The extracted folder if the entry is complete (with the expected sha256), else None."""
        try:
            marker = json.loads((self.folder / MARKER).read_text())
        except (FileNotFoundError, ValueError):
            return None
        if self.sha256 and marker["sha256"] != self.sha256:
            log.info("%s: the stored copy has sha256 %s, the URL asks for %s", self.url, marker["sha256"], self.sha256)
            return None
        return self.folder / marker["root"]


def entry_key(url: str) -> str:
    name = PurePosixPath(urlsplit(url).path).name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:48] or "archive"
    return f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def fetch_archive(url: str, weights_dir: Path, *, max_bytes: int | None = None, deadline: float | None = None,
                  session: requests.Session | None = None, cancel: Cancel | None = None,
                  read_timeout: float = READ_TIMEOUT, retries: int = RETRIES, retry_wait: float = RETRY_WAIT) -> Path:
    """The folder of the extracted archive at `url` (its single top-level folder, if it has one), downloaded once.
    For a request's adapter: `max_bytes` caps the bytes announced, received and extracted; with a `session` (which
    pget would bypass), pget is not used."""
    entry = ArchiveEntry.of(url, weights_dir)
    found = entry.lookup()
    if found is not None:
        log.info("%s: cached at %s", entry.url, found)
        return found
    if offline():
        raise UnreachableError(f"{entry.url}: not in the cache at {weights_dir}, and HF_HUB_OFFLINE=1 forbids "
                               f"downloading it")
    entry.folder.parent.mkdir(parents=True, exist_ok=True)
    stream = dict(max_bytes=max_bytes, deadline=deadline, session=session, cancel=cancel, read_timeout=read_timeout,
                  retries=retries, retry_wait=retry_wait)
    with FileLock(entry.guard):
        try:
            return entry.lookup() or _install(entry, stream)  # another process may have finished it meanwhile
        finally:
            entry.part.unlink(missing_ok=True)


def _install(entry: ArchiveEntry, stream: dict) -> Path:
    """Download, check and extract; a download with the wrong sha256 is fetched again once."""
    for attempt in (1, 2):
        _download(entry, stream)
        started = time.monotonic()
        with open(entry.part, "rb") as file:
            sha256 = hashlib.file_digest(file, "sha256").hexdigest()
        size = entry.part.stat().st_size
        if not entry.sha256 or sha256 == entry.sha256:
            log.info("%s: verified %s (sha256 %s) in %.1f s", entry.url, mb(size), sha256, time.monotonic() - started)
            break
        problem = f"sha256 {sha256}, the URL expects {entry.sha256}"
        entry.part.unlink()
        if attempt == 2:
            raise WeightsError(f"{entry.url}: the download is corrupt again ({problem}); nothing was kept")
        log.warning("%s: the download is corrupt (%s); fetching it again", entry.url, problem)
    _extract(entry, sha256, size, stream["max_bytes"])
    return entry.lookup()


def _download(entry: ArchiveEntry, stream: dict) -> None:
    started = time.monotonic()
    pget = shutil.which("pget") if stream["session"] is None else None
    if pget:
        entry.part.unlink(missing_ok=True)  # pget refuses to overwrite a file
        log.info("%s: downloading with %s", entry.url, pget)
        result = subprocess.run([pget, entry.url, str(entry.part)], capture_output=True, text=True)
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()[-2000:]
            raise WeightsError(f"{entry.url}: pget failed (exit {result.returncode}): {output}")
    else:
        fetch_file(entry.url, entry.part, announced=True, **stream)
    seconds, size = time.monotonic() - started, entry.part.stat().st_size
    log.info("%s: downloaded %s in %.1f s (%.1f MB/s)", entry.url, mb(size), seconds, size / 1e6 / max(seconds, 1e-3))


def _extract(entry: ArchiveEntry, sha256: str, size: int, max_bytes: int | None) -> None:
    started = time.monotonic()
    staging = entry.folder.with_name(entry.key + ".staging")
    shutil.rmtree(staging, ignore_errors=True)  # left by a process that died while extracting
    staging.mkdir(parents=True)
    try:
        extract_archive(entry.part, staging, entry.url, zip_name=urlsplit(entry.url).path.lower().endswith(".zip"),
                        max_bytes=max_bytes)
        children = list(staging.iterdir())  # `tar czf x.tgz mymodel/` has one top-level folder: that is the model
        root = children[0].name if len(children) == 1 and children[0].is_dir() else "."
        (staging / MARKER).write_text(json.dumps({"url": entry.url, "sha256": sha256, "size": size, "root": root}))
        (entry.folder / MARKER).unlink(missing_ok=True)  # a stale entry (the URL now expects another sha256):
        shutil.rmtree(entry.folder, ignore_errors=True)  # unmarked first, so that no half-removed copy is ever used
        staging.rename(entry.folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("%s: extracted into %s in %.1f s", entry.url, entry.folder, time.monotonic() - started)
