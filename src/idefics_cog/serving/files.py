"""A request's file inputs (`image`, `images`): only the files Cog received for it, its image URLs fetched later
under the rules a stranger's `lora_weights` meets. `install` replaces coglet 0.23.1's `URLPath.convert`, which
fetches URLs unguarded and hands any other string to `run` as a server path."""

import logging
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import cog.types

from idefics_cog.config import ImageLimits
from idefics_cog.errors import InputError, WeightsError, shorten
from idefics_cog.weights.fetch_pool import Recent
from idefics_cog.weights.stream import Cancel, Cancelled, fetch_file
from idefics_cog.weights.url_guard import guarded_session

log = logging.getLogger(__name__)

REMEMBERED_FILES = 4096  # files converted and not yet claimed nor removed (16 requests of 8 images use 128)
NOT_RECEIVED = ("must be a file sent with the request (an upload, an http(s) URL or a data: URI); "
                "paths on the server are not read")
_received = Recent(REMEMBERED_FILES)  # path of a converted file -> its URL (fetched later), or None
_HOOKED = "_idefics_received"


class Files:

    def __init__(self, limits: ImageLimits, download_seconds: float):
        self.limits, self.download_seconds = limits, download_seconds

    def claim(self, named: list[tuple[str, object]]) -> list[tuple[str, Path, str | None]]:
        """(name, path, URL still to fetch or None) for files Cog converted and no request claimed yet; else an
        InputError naming the first path on the server."""
        for name, path in named:  # coglet 0.23.1 leaves a list mixing URLs and paths unconverted
            if not isinstance(path, cog.types.URLPath) and _received.get(str(path), _MISSING) is _MISSING:
                raise InputError(f"{name}: {NOT_RECEIVED}")
        claimed = []
        for name, path in named:
            url = _received.pop(str(path), _MISSING)
            if url is _MISSING:  # claimed meanwhile by another request
                raise InputError(f"{name}: {NOT_RECEIVED}")
            claimed.append((name, Path(path), url))
        return claimed

    def fetch(self, name: str, path: Path, url: str, deadline: float, cancel: Cancel | None = None) -> None:
        """Blocking: run it where it holds no other request."""
        try:
            fetch_file(url, path, max_bytes=self.limits.max_bytes, deadline=deadline, session=guarded_session(),
                       cancel=cancel, settings=("IDEFICS_IMAGE_DOWNLOAD_SECONDS", "IDEFICS_MAX_IMAGE_BYTES"))
        except Cancelled:
            raise
        except WeightsError as exc:
            raise InputError(shorten(f"{name}: {exc}", 600)) from None

    def deadline(self) -> float:
        return time.monotonic() + self.download_seconds


_MISSING = object()


def install(max_images: int) -> None:
    """Idempotent."""
    if getattr(cog.types.URLPath.convert, _HOOKED, False):
        return
    original_convert, original_unlink = cog.types.URLPath.convert, cog.types.URLPath.unlink

    def convert(self) -> cog.types.Path:
        if self._path is None:
            pool = _Pool.of_this_thread(max_images)
            if urlsplit(self.source).scheme in ("http", "https"):
                with tempfile.NamedTemporaryFile(suffix=self.filename, delete=False) as empty:
                    self._path = cog.types.Path(empty.name)
                _received.put(str(self._path), self.source)
            else:
                _received.put(str(original_convert(self)), None)
            if pool is not None:
                pool.written(self._path)
        return self._path

    def unlink(self, missing_ok: bool = False) -> None:
        if self._path is not None:
            _received.pop(str(self._path))
        original_unlink(self, missing_ok=missing_ok)

    setattr(convert, _HOOKED, True)
    cog.types.URLPath.convert, cog.types.URLPath.unlink = convert, unlink


class _Pool:
    """Files converted on one of coglet 0.23.1's per-prediction pools: past the image limit (plus one, so that the
    request can say how many it sent) refused unwritten, and those written removed (coglet would remove none)."""

    _pools = Recent(1024)
    _lock = threading.Lock()
    _warned = False

    def __init__(self, limit: int):
        self.limit, self.count, self.paths, self.refused = limit, 0, [], False

    @classmethod
    def of_this_thread(cls, max_images: int) -> "_Pool | None":
        name = threading.current_thread().name
        if not name.startswith("ThreadPoolExecutor-"):
            if not cls._warned:
                cls._warned = True
                log.warning("a file input was converted on thread %r, not on one of coglet 0.23.1's pools: files "
                            "past the image limit are no longer refused before they are written", name)
            return None
        key = name.rpartition("_")[0]
        with cls._lock:
            pool = cls._pools.get(key) or cls(max_images + 1)
            cls._pools.put(key, pool)
            pool.count += 1
            if pool.count > pool.limit and not pool.refused:
                pool.refused = True
                for path in pool.paths:
                    _discard(path)
            if pool.refused:
                raise ValueError(f"image, images: more than {pool.limit} files given; the limit is {max_images} "
                                 f"per request (IDEFICS_MAX_IMAGES)")
        return pool

    def written(self, path) -> None:
        with self._lock:
            if self.refused:
                _discard(path)
            else:
                self.paths.append(path)


def _discard(path) -> None:
    _received.pop(str(path))
    Path(path).unlink(missing_ok=True)
