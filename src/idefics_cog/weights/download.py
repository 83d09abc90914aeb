"""The operator's downloads: a setting (IDEFICS_BASE_WEIGHTS, IDEFICS_ADAPTER_WEIGHTS, COG_WEIGHTS) to a local folder,
and `main` (`idefics-cog download`, `script/download-weights`), which fills the weights folder before `cog push`."""

import argparse
import logging
import sys
from pathlib import Path

from idefics_cog.config import Settings
from idefics_cog.errors import WeightsError
from idefics_cog.weights.archive import fetch_archive
from idefics_cog.weights.hub import fetch_hub
from idefics_cog.weights.source import HUB_ID, is_url


def resolve(source: str, weights_dir: Path, max_bytes: int | None = None, adapter: bool = False) -> Path:
    """The local folder holding `source` (a folder, an archive URL or a hub id), downloaded into `weights_dir` first
    if needed. `max_bytes` caps an archive; `adapter`: a LoRA adapter, whose hub repo may offer adapter_model.bin
    only."""
    path = Path(source).expanduser()
    if is_url(source):
        return fetch_archive(source, weights_dir, max_bytes=max_bytes)
    if path.is_dir():
        return path
    if HUB_ID.match(source) and not path.exists():
        repo_id, _, revision = source.partition("@")
        return fetch_hub(repo_id, revision or None, weights_dir, adapter=adapter)
    raise WeightsError(f"weight source {source!r} is not a directory, an http(s) URL of a .tar/.zip, or a Hugging "
                       f"Face repo id (owner/name[@revision])")


def main(argv: list[str] | None = None, prog: str = "idefics-cog download") -> int:
    """Download the weights the settings name; print `<role>: <source> -> <folder>` for each. Exit status 2 for a
    bad setting, 1 for a download that failed."""
    argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download the weights named by IDEFICS_BASE_WEIGHTS and IDEFICS_ADAPTER_WEIGHTS into the weights "
        "folder (IDEFICS_CACHE_DIR, weights/ by default), so that `cog push` bakes them into the image.",
        epilog="example:\n  IDEFICS_BASE_WEIGHTS=HuggingFaceM4/idefics-9b-instruct IDEFICS_ADAPTER_WEIGHTS=none "
               "idefics-cog download",
    ).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"download-weights: {exc}", file=sys.stderr)
        return 2
    sources = [("base", settings.base_weights)] + ([("adapter", settings.adapter_weights)]
                                                   if settings.adapter_weights else [])  # "" when `none`
    for role, source in sources:
        try:
            path = resolve(source, settings.cache_dir, adapter=role == "adapter")
        except WeightsError as exc:
            print(f"download-weights: {role} weights: {exc}", file=sys.stderr)
            return 1
        print(f"{role}: {source} -> {path}", flush=True)
    return 0
