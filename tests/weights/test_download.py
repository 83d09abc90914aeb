"""The operator's downloads (weights/download.py): a setting resolved to a folder, and script/download-weights."""

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from idefics_cog.config import ROOT
from idefics_cog.errors import WeightsError
from idefics_cog.weights.download import resolve

pytestmark = pytest.mark.usefixtures("online_without_pget")


def with_sha(url: str, data: bytes) -> str:
    return f"{url}#sha256={hashlib.sha256(data).hexdigest()}"


def tar_directory(folder: Path, top: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=top)
    return buffer.getvalue()


def test_resolved_url_is_a_loadable_model(file_server, cache, tiny_dir):
    from idefics_cog.serving.engine import Engine

    data = tar_directory(tiny_dir / "base", "tiny-idefics")
    url = file_server.add("/weights/tiny-idefics.tar.gz", data)
    path = resolve(with_sha(url, data), cache)
    assert path.name == "tiny-idefics" and path.is_relative_to(cache)
    engine = Engine.load(path, "cpu")
    assert engine.model.config.model_type == "idefics"


def test_download_weights_script_fills_the_cache(file_server, cache, tiny_dir):
    base = file_server.add("/base.tar.gz", tar_directory(tiny_dir / "base", "base"))
    adapter = file_server.add("/adapter.tar", tar_directory(tiny_dir / "adapter", "adapter"))
    env = {
        **os.environ,
        "IDEFICS_BASE_WEIGHTS": base,
        "IDEFICS_ADAPTER_WEIGHTS": adapter,
        "IDEFICS_CACHE_DIR": str(cache),
    }
    run = subprocess.run(
        [str(ROOT / "script" / "download-weights")], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    base_path = Path(lines["base"].split(" -> ")[1])
    adapter_path = Path(lines["adapter"].split(" -> ")[1])
    assert lines["base"].startswith(f"{base} -> ") and (base_path / "config.json").is_file()
    assert lines["adapter"].startswith(f"{adapter} -> ") and (adapter_path / "adapter_config.json").is_file()
    assert base_path.is_relative_to(cache / "archives") and adapter_path.is_relative_to(cache / "archives")
    assert "downloaded" in run.stderr and "extracted" in run.stderr  # the stage logs

    # A second run (as at the next `cog push`) finds everything in the cache.
    file_server.reset_counts()
    again = subprocess.run(
        [str(ROOT / "script" / "download-weights")], env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and again.stdout == run.stdout
    assert file_server.requests == []


def test_download_weights_script_reports_a_failure(file_server, cache):
    env = {
        **os.environ,
        "IDEFICS_BASE_WEIGHTS": file_server.url("/nothing.tgz"),
        "IDEFICS_ADAPTER_WEIGHTS": "none",
        "IDEFICS_CACHE_DIR": str(cache),
    }
    run = subprocess.run(
        [str(ROOT / "script" / "download-weights")], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1
    assert f"base weights: {file_server.url('/nothing.tgz')}: HTTP 404" in run.stderr


def test_a_missing_local_folder_is_refused_naming_it(tmp_path, cache):
    with pytest.raises(WeightsError, match=r"weight source '.*/missing' is not a directory"):
        resolve(str(tmp_path / "missing"), cache)
