import os
from pathlib import Path

import pytest

from tests.support.fileserver import FileServer


@pytest.fixture
def online_without_pget(monkeypatch):
    """Online, and our own download even on a machine where pget is installed."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    path = [folder for folder in os.environ.get("PATH", "").split(os.pathsep) if not (Path(folder) / "pget").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(path))


@pytest.fixture
def file_server():
    """A loopback HTTP server of files (the Cog server is `server`)."""
    with FileServer() as running:
        yield running


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"
