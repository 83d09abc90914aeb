"""A custom adapter's download (adapters/downloads.py): a request's source by url_guard's rules, one download
per source, failures remembered briefly, a deadline, and the adapter downloads' byte budget."""

import concurrent.futures
import os
import time

import pytest

from idefics_cog.adapters.checks import layer_shapes
from idefics_cog.adapters.downloads import AdapterDownloads
from idefics_cog.errors import InputError
from idefics_cog.weights.url_guard import ALLOW_PRIVATE, check_request_source
from tests.support.fileserver import Fault, FileServer
from tests.support.helpers import tar_bytes


@pytest.fixture
def files():
    with FileServer() as server:
        yield server


def test_weights_tiny_is_a_hub_id_for_a_request_never_the_local_folder(engine, tiny_dir, tmp_path, monkeypatch):
    """`weights/tiny` exists on the server (the tiny model, relative to the working directory), and matches the
    hub-id pattern: for a request it is a hub repo, looked up (offline here: not found), never the folder."""
    assert check_request_source("weights/tiny") == "hub"
    monkeypatch.chdir(tiny_dir.parent.parent)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapters = AdapterDownloads(layer_shapes(engine.model), tmp_path / "cache")
    with pytest.raises(InputError) as refused:
        adapters.fetch("weights/tiny")
    message = str(refused.value)
    assert message.startswith("lora_weights: Hugging Face repo weights/tiny")
    assert str(tmp_path) not in message and str(tiny_dir) not in message and "<cache>" in message


def test_a_failing_source_is_refused_fast_with_the_same_message(engine, tmp_path, files, monkeypatch):
    monkeypatch.setenv(ALLOW_PRIVATE, "1")
    adapters = AdapterDownloads(layer_shapes(engine.model), tmp_path / "cache")
    url = files.url("/missing.tgz")
    with pytest.raises(InputError) as first:
        adapters.fetch(url)
    assert "404" in str(first.value)
    asked = len(files.requests)
    with pytest.raises(InputError) as again:
        adapters.fetch(url)
    assert str(again.value) == str(first.value) and len(files.requests) == asked
    monkeypatch.setattr(adapters.failures, "seconds", 0.0)  # remembered briefly only (FAILURE_MEMORY_S)
    with pytest.raises(InputError):
        adapters.fetch(url)
    assert len(files.requests) > asked


@pytest.mark.slow
def test_requests_for_one_source_share_one_download(engine, tiny_dir, tmp_path, files, monkeypatch):
    monkeypatch.setenv(ALLOW_PRIVATE, "1")
    adapters = AdapterDownloads(layer_shapes(engine.model), tmp_path / "cache")
    url = files.add("/adapter.tgz", tar_bytes(tiny_dir / "adapter"), Fault(trickle=1.0))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(adapters.fetch, [url] * 4))
    assert len(set(paths)) == 1 and (paths[0] / "adapter_model.safetensors").is_file()
    assert files.count("/adapter.tgz", "GET") == 1


def test_loopback_urls_are_refused_without_allow_private_urls(engine, tiny_dir, tmp_path, files, monkeypatch):
    monkeypatch.delenv(ALLOW_PRIVATE, raising=False)
    adapters = AdapterDownloads(layer_shapes(engine.model), tmp_path / "cache")
    url = files.add("/adapter.tgz", tar_bytes(tiny_dir / "adapter"))
    with pytest.raises(InputError, match=r"lora_weights: .*only https URLs are fetched"):
        adapters.fetch(url)
    with pytest.raises(InputError, match=r"lora_weights: .*127\.0\.0\.1.*only public addresses"):
        adapters.fetch(url.replace("http://", "https://"))
    assert files.requests == []


@pytest.mark.slow
def test_a_trickling_download_stops_at_its_deadline(engine, tiny_dir, tmp_path, files, monkeypatch):
    monkeypatch.setenv(ALLOW_PRIVATE, "1")
    adapters = AdapterDownloads(layer_shapes(engine.model), tmp_path / "cache", download_seconds=1)
    url = files.add("/slow.tgz", tar_bytes(tiny_dir / "adapter"), Fault(trickle=20.0))
    started = time.monotonic()
    with pytest.raises(InputError, match=r"did not finish within its deadline"):
        adapters.fetch(url)
    assert time.monotonic() - started < 5
    assert not list((tmp_path / "cache").rglob("*.part"))  # the partial download is gone


def test_the_adapter_downloads_drop_the_least_recently_used_beyond_their_budget(tmp_path):
    downloads = AdapterDownloads({}, tmp_path, budget_bytes=2500)
    for age, name in enumerate(["old", "middle", "new"]):
        entry = downloads.folder / name
        entry.mkdir(parents=True)
        (entry / "weights").write_bytes(b"x" * 1000)
        (entry / ".last_used").touch()
        os.utime(entry / ".last_used", (1000 + age, 1000 + age))
    downloads.trim(keep=downloads.folder / "old")  # the one in use stays, whatever its age
    assert sorted(p.name for p in downloads.folder.iterdir()) == ["new", "old"]
