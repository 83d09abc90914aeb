"""Resolve a weight source (a local directory or a Hugging Face repo id) to a local directory."""

import re
from pathlib import Path

# safetensors and the small files beside them; pickled `.bin` weights are never fetched.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


class WeightsError(RuntimeError):
    pass


def resolve(source: str, cache_dir: Path) -> Path:
    """Return the local directory holding `source`, downloading it into `cache_dir` when it is a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if _HUB_ID.match(source) and not path.exists():
        return _from_hub(source, cache_dir)
    raise WeightsError(f"weight source {source!r} is neither a directory nor a Hugging Face repo id (owner/name[@rev])")


def _from_hub(source: str, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download

    repo_id, _, revision = source.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache_dir / "hub",
                                      allow_patterns=HUB_FILES))
    except Exception as exc:  # huggingface_hub raises many types; all mean the same to the user
        raise WeightsError(f"could not fetch weight source {source!r}: {exc}") from exc
