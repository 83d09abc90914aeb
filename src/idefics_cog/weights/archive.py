"""Weights archives at http(s) URLs: downloaded once into the cache, verified, safely extracted.

The Replicate weights-CDN convention: a .tar, .tar.gz/.tgz or .zip at an http(s) URL, optionally ending in
`#sha256=<64 hex>` (the sha256 of the archive file). The cache layout is in cache.py, the transfer in transfer.py,
the extraction in extract.py; `python -m idefics_cog.weights` (`script/download-weights`) fills the cache before
`cog push`.
"""

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import requests

from idefics_cog.weights.base import UnreachableError, WeightsError, env_flag
from idefics_cog.weights.cache import MARKER, Entry, cache_key, locked
from idefics_cog.weights.extract import extract_archive, move_into_place, root
from idefics_cog.weights.cancel import Cancel
from idefics_cog.weights.transfer import (CHUNK_SIZE, CONNECT_TIMEOUT, READ_TIMEOUT, RETRIES, RETRY_WAIT, THREADS,
                                          Options, download, mb)

log = logging.getLogger("idefics_cog.weights.archive")

__all__ = ["MARKER", "cache_key", "extract_archive", "fetch_archive", "offline"]


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
    cancel: Optional[Cancel] = None,
) -> Path:
    """Return the directory holding the extracted archive at `url`, downloading it into `cache_dir` once.

    When the archive holds a single top-level directory, that directory is returned. For a request's adapter:
    `max_bytes` caps the bytes announced, received and extracted; `deadline` (a time.monotonic() value) ends the
    whole transfer; `session` sends the requests (and pget, which would bypass it, is not used); `cancel` stops it.
    A transfer that fails leaves no partial download behind when `max_bytes` is set.
    """
    entry = Entry.of(url, Path(cache_dir))
    found = entry.lookup()
    if found is not None:
        log.info("%s: cached at %s", entry.url, found)
        return found
    if offline():
        raise UnreachableError(f"{entry.url}: not in the cache at {cache_dir}, and HF_HUB_OFFLINE=1 forbids downloading it")
    options = Options(chunk_size, threads, connect_timeout, read_timeout, retries, retry_wait, max_bytes, deadline,
                      session, cancel)
    for folder in (entry.final.parent, entry.part.parent, entry.lock.parent):
        folder.mkdir(parents=True, exist_ok=True)
    with locked(entry):
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


# --- download, verify, extract ---------------------------------------------------------------------------------


class _Corrupt(Exception):
    """The downloaded file is not the one announced (size or sha256)."""


def _install(entry: Entry, options: Options) -> Path:
    """Download, verify and extract the entry (its lock held); return the extracted directory."""
    for attempt in (1, 2):
        size = download(entry, options)
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
    log.info("%s: verified %s (sha256 %s) in %.1f s", entry.url, mb(actual), sha256, time.monotonic() - started)
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
        marker = {"url": entry.url, "sha256": sha256, "size": entry.part.stat().st_size, "root": root(staging)}
        (staging / MARKER).write_text(json.dumps(marker, indent=1))
        move_into_place(staging, entry.final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("%s: extracted into %s in %.1f s", entry.url, entry.final, time.monotonic() - started)
