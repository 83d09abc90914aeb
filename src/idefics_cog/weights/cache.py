"""Where one weights archive lives in the cache, and the file lock that keeps two processes from fetching it twice.

Per archive, under the cache directory (`<key>` is the file's stem plus a short sha256 of the URL without its
fragment):

    archives/<key>/           the extracted archive, complete: its MARKER is written last, in a staging
                              directory that is then renamed into place, so a partial entry is never seen
    downloads/<key>.part      the archive being downloaded (deleted once extracted)
    downloads/<key>.json      the byte ranges of .part already downloaded, so a new process resumes there
    locks/<key>.lock          held while downloading and extracting: two processes never do it twice
"""

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional
from urllib.parse import urlsplit

from filelock import FileLock, Timeout

from idefics_cog.weights.base import WeightsError

log = logging.getLogger("idefics_cog.weights.archive")

MARKER = ".idefics-cog-archive.json"
SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
FRAGMENT = re.compile(r"^sha256=([0-9a-fA-F]{64})$")


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


class locked:
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
