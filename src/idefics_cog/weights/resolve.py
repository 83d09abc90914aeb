"""Resolve a weight source to a local directory, for the base model and for every adapter.

A source is one of:
- a local directory (used as it is);
- an `https://` (or `http://`) URL of a .tar, .tar.gz or .zip archive, optionally ending in `#sha256=<hex>`
  (downloaded in parallel byte ranges, verified, safely extracted; see archive.py);
- a Hugging Face repo id, optionally with a pinned revision: `owner/name@revision` (see hub.py).

Everything downloaded lives under the cache directory (`weights/` by default), which `cog predict` mounts, so a
second setup finds it there and downloads nothing.
"""

from pathlib import Path

from idefics_cog.weights.archive import fetch_archive
from idefics_cog.weights.base import HUB_ID, WeightsError, is_url
from idefics_cog.weights.hub import fetch_hub


def resolve(source: str, cache_dir: Path, max_bytes: int | None = None, adapter: bool = False) -> Path:
    """Return the local directory holding `source`, downloading it into `cache_dir` first if needed.
    `max_bytes` refuses an archive URL larger than that before downloading it. `adapter`: a LoRA adapter, whose
    hub repo may offer its weights as adapter_model.bin only (fetched too, for the weights-only loader)."""
    path = Path(source).expanduser()
    if is_url(source):
        return fetch_archive(source, cache_dir, max_bytes=max_bytes)
    if path.is_dir():
        return path
    if HUB_ID.match(source) and not path.exists():
        repo_id, _, revision = source.partition("@")
        return fetch_hub(repo_id, revision or None, cache_dir, adapter=adapter)
    raise WeightsError(
        f"weight source {source!r} is not a directory, an http(s) URL of a .tar/.zip, or a Hugging Face repo id "
        f"(owner/name[@revision])"
    )
