"""One streamed download (weights/stream.py): the byte cap on what arrives, the cancel, nothing left on failure."""

import os

import pytest

from idefics_cog.errors import WeightsError
from idefics_cog.weights.stream import Cancel, Cancelled, fetch_file
from tests.support.fileserver import Fault


def test_fetch_file_caps_the_bytes_received_and_leaves_nothing_on_failure(file_server, tmp_path):
    """fetch_file, a request's hub adapter file: the cap holds on what arrives, whatever was announced."""
    import time

    url = file_server.add("/adapter_model.safetensors", os.urandom(5000))
    with pytest.raises(WeightsError, match=r"more than the limit of 4000 bytes received; stopped"):
        fetch_file(url, tmp_path / "adapter_model.safetensors", max_bytes=4000, deadline=time.monotonic() + 30)
    assert list(tmp_path.iterdir()) == []
    fetch_file(url, tmp_path / "adapter_model.safetensors", max_bytes=5000, deadline=time.monotonic() + 30)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == file_server.files["/adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_model.safetensors"]


def test_a_cancel_stops_a_trickling_download_at_once(file_server, tmp_path):
    """A request that goes away stops its download within a moment, even while the read waits on a slow server."""
    import threading
    import time

    url = file_server.add("/slow.safetensors", os.urandom(100_000), Fault(trickle=30.0))
    cancel = Cancel()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled, match="the request was cancelled; the download stopped"):
        fetch_file(url, tmp_path / "a", max_bytes=1 << 20, deadline=time.monotonic() + 60, cancel=cancel)
    assert time.monotonic() - started < 3 and list(tmp_path.iterdir()) == []
    deadline = time.monotonic() + 5
    while not file_server.abandoned["/slow.safetensors"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert file_server.abandoned["/slow.safetensors"] == 1  # the connection was closed mid-body
