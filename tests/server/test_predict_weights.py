"""Weights and adapters through the real Cog server, with sources on a real loopback HTTP server."""

import concurrent.futures
import io
import os
import re
import shutil
import tarfile
import time

import pytest

from idefics_dev.cogrunner import CogServer, ServerError
from idefics_cog.weights.url_guard import ALLOW_PRIVATE
from tests.conftest import ADAPTER_LIMIT, tiny_env
from tests.support.fileserver import Fault, FileServer
from tests.support.helpers import adapter_with_config, bin_adapter, hostile_adapter, negated_adapter, tar_bytes
from tests.support.server import REQUEST, answer, reference, send


def failure(server, **inputs) -> str:
    result = server.predict({**REQUEST, **inputs})
    assert result["status"] == "failed"
    return result["error"]


@pytest.fixture(scope="module")
def other_adapter(tiny_dir, tmp_path_factory):
    """A second adapter for the tiny model: the tiny one with its B matrices negated."""
    return negated_adapter(tiny_dir / "adapter", tmp_path_factory.mktemp("other") / "adapter")


@pytest.fixture(scope="module")
def hostile_marker(tmp_path_factory):
    """The file the hostile adapter_model.bin would create if it were ever unpickled."""
    return tmp_path_factory.mktemp("hostile") / "marker"


def pickled_as(adapter, folder, name):
    """`adapter` with its safetensors file renamed `name` (not a pickle at all)."""
    shutil.copytree(adapter, folder)
    (folder / "adapter_model.safetensors").rename(folder / name)
    return folder


@pytest.fixture(scope="module")
def files(tiny_dir, other_adapter, tmp_path_factory, hostile_marker):
    made = tmp_path_factory.mktemp("made")
    with FileServer() as server:
        server.add("/other.tgz", tar_bytes(other_adapter))
        server.add("/other-bin.tgz", tar_bytes(bin_adapter(other_adapter, made / "other-bin")))
        server.add("/hostile.tgz", tar_bytes(hostile_adapter(tiny_dir / "adapter", made / "hostile", hostile_marker)))
        server.add("/pickled.tgz", tar_bytes(pickled_as(tiny_dir / "adapter", made / "pickled", "pytorch_model.bin")))
        server.add("/not-torch.tgz", tar_bytes(pickled_as(tiny_dir / "adapter", made / "not-torch",
                                                           "adapter_model.bin")))
        server.add("/pissa.tgz", tar_bytes(adapter_with_config(tiny_dir / "adapter", made / "pissa",
                                                               init_lora_weights="pissa")))
        server.add("/dora.tgz", tar_bytes(adapter_with_config(tiny_dir / "adapter", made / "dora", use_dora=True)))
        server.add("/base.tgz", tar_bytes(tiny_dir / "base", top="tiny-base"))
        server.add("/adapter.tgz", tar_bytes(tiny_dir / "adapter"))
        for kind in ("dotdot", "absolute", "symlink"):
            server.add(f"/{kind}.tar", unsafe_tar(kind))
        big = tmp_path_factory.mktemp("big") / "adapter"
        shutil.copytree(tiny_dir / "adapter", big)
        (big / "padding.bin").write_bytes(os.urandom(ADAPTER_LIMIT + 1))
        server.add("/big.tgz", tar_bytes(big))
        yield server


def unsafe_tar(kind: str) -> bytes:
    """An adapter archive with a member that climbs out of the extraction folder, or a link."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        if kind == "symlink":
            info = tarfile.TarInfo("adapter_model.safetensors")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info = tarfile.TarInfo({"dotdot": "../adapter_config.json", "absolute": "/tmp/adapter_config.json"}[kind])
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    return buffer.getvalue()


def test_adapters_switch_per_request_like_each_loaded_alone(server, files, tiny_dir, other_adapter):
    expected = {"medical": reference(tiny_dir, tiny_dir / "adapter"), "none": reference(tiny_dir),
                "custom": reference(tiny_dir, other_adapter)}
    assert len(set(expected.values())) == 3
    custom = files.url("/other.tgz")
    for step in ["medical", "none", "custom", "medical", "custom", "none"]:
        inputs = {"lora_weights": custom} if step == "custom" else {"adapter": step}
        assert answer(server, **inputs) == expected[step], step
    assert files.count("/other.tgz", "GET") >= 1
    downloads = files.count("/other.tgz", "GET")
    loads = sum(custom in line and "loaded in" in line for line in server.log_path.read_text().splitlines())
    assert loads == 1
    result = server.predict({**REQUEST, "lora_weights": custom})
    assert files.count("/other.tgz", "GET") == downloads  # no second download
    assert sum(custom in line and "loaded in" in line for line in server.log_path.read_text().splitlines()) == 1
    # The adapter is selected on the engine's thread, in the prediction's context: its log lines are its own.
    assert "adapter: custom_" in result["logs"] and "loaded" not in result["logs"]  # and no reload
    assert answer(server, lora_weights=custom, lora_scale=0.0) == expected["none"]


def test_a_4bit_server_answers_the_same_after_a_custom_adapter(files, tiny_dir, tmp_path):
    """In the order a user triggers it: medical loaded at setup, requests, then a custom `lora_weights`, then the
    first requests again. On CPUs with AVX512-BF16, PEFT's own adapter loading made these answers drift."""
    env = {**tiny_env(tiny_dir), "IDEFICS_QUANTIZATION": "4bit", "IDEFICS_CACHE_DIR": str(tmp_path / "cache"),
           ALLOW_PRIVATE: "1"}
    with CogServer(env=env) as server:
        before = {choice: answer(server, adapter=choice) for choice in ("medical", "none")}
        assert before["medical"] != before["none"]
        assert answer(server, lora_weights=files.url("/other.tgz")) not in before.values()
        assert {choice: answer(server, adapter=choice) for choice in ("medical", "none")} == before


BAD_ADAPTERS = {
    "pickled weights": ("/pickled.tgz", r"lora_weights: pickled weights \(pytorch_model.bin\) are refused"),
    "hostile adapter_model.bin": ("/hostile.tgz", r"lora_weights: adapter_model.bin is refused: torch's weights-only "
                                                  r"loader cannot read it .*Unsupported global"),
    "adapter_model.bin not from torch": ("/not-torch.tgz", r"lora_weights: adapter_model.bin is refused"),
    "a whole model, not an adapter": ("/base.tgz", r"lora_weights: not a PEFT adapter"),
    "DoRA": ("/dora.tgz", r"lora_weights: adapter_config.json sets use_dora, which is not supported"),
    "missing file": ("/missing.tgz", r"lora_weights: .*missing.tgz.*404"),
    "archive member outside": ("/dotdot.tar", r"lora_weights: .*'\.\./adapter_config.json' points outside"),
    "archive member absolute": ("/absolute.tar", r"lora_weights: .*'/tmp/adapter_config.json' points outside"),
    "archive member a link": ("/symlink.tar", r"lora_weights: .*'adapter_model.safetensors' is a symlink"),
    "over the size limit": ("/big.tgz", rf"lora_weights: .*over the limit of {ADAPTER_LIMIT} bytes"),
    "file scheme": ("file:///etc/passwd", r"lora_weights: 'file:///etc/passwd' is neither an https URL"),
    "local path": ("/etc", r"lora_weights: '/etc' is neither"),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_bad_lora_weights_fail_clearly_and_change_nothing(server, files, case):
    before = {choice: answer(server, adapter=choice) for choice in ("medical", "none")}
    source, message = BAD_ADAPTERS[case]
    error = failure(server, lora_weights=files.url(source) if source.endswith((".tgz", ".tar")) else source)
    assert re.search(message, error), error
    assert {choice: answer(server, adapter=choice) for choice in ("medical", "none")} == before


def test_an_adapter_whose_config_asks_for_pissa_leaves_the_shared_base_alone(server, files):
    """PEFT's PiSSA initialisation rewrites the base layers: one request's adapter would change every answer."""
    before = {choice: answer(server, adapter=choice) for choice in ("medical", "none")}
    assert answer(server, lora_weights=files.url("/pissa.tgz")) == before["medical"]  # the tiny adapter's matrices
    assert {choice: answer(server, adapter=choice) for choice in ("medical", "none")} == before


def test_a_hostile_pickle_never_runs_in_the_server(server, files, hostile_marker):
    assert re.search(r"Unsupported global", failure(server, lora_weights=files.url("/hostile.tgz")))
    assert not hostile_marker.exists()


def test_an_adapter_model_bin_archive_answers_as_its_safetensors_twin(server, files, tiny_dir, other_adapter):
    expected = reference(tiny_dir, other_adapter)
    assert answer(server, lora_weights=files.url("/other-bin.tgz")) == expected
    assert answer(server, lora_weights=files.url("/other-bin.tgz")) == expected  # loaded once, cached


def test_setup_downloads_once_and_the_second_setup_uses_the_cache(files, tiny_dir, tmp_path):
    env = {"IDEFICS_BASE_WEIGHTS": files.url("/base.tgz"), "IDEFICS_ADAPTER_WEIGHTS": files.url("/adapter.tgz"),
           "IDEFICS_CACHE_DIR": str(tmp_path / "cache")}
    files.reset_counts()
    # Two servers set up at once on an empty cache: both become READY, from one download of each archive.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: CogServer(env=env), range(2)))
        try:
            list(pool.map(lambda s: s.start(), servers))
            outputs = [answer(s, adapter="medical") for s in servers]
        finally:
            for s in servers:
                s.stop()
    assert outputs[0] == outputs[1] == reference(tiny_dir, tiny_dir / "adapter")
    fetched = {path: files.bytes_served(path) for path in ("/base.tgz", "/adapter.tgz")}
    assert fetched == {path: len(files.files[path]) for path in fetched}
    files.reset_counts()
    with CogServer(env=env) as again:
        assert answer(again, adapter="medical") == outputs[0]
        assert "cached" in again.health()["setup"]["logs"]
    assert files.count("/base.tgz") == files.count("/adapter.tgz") == 0


def test_setup_with_an_unreachable_source_names_it(files, tmp_path):
    env = {"IDEFICS_BASE_WEIGHTS": files.url("/nothing-here.tgz"), "IDEFICS_ADAPTER_WEIGHTS": "none",
           "IDEFICS_CACHE_DIR": str(tmp_path / "cache")}
    server = CogServer(env=env)
    try:
        with pytest.raises(ServerError, match=r"SETUP_FAILED[\s\S]*nothing-here.tgz[\s\S]*404"):
            server.start()
    finally:
        server.stop()


# As long as the issue asks: a stall would add the whole trickle to the other requests.
TRICKLE_S = 15.0  # long enough to outlast three rounds of the other requests, on a loaded 2-core VM


def test_a_trickling_adapter_download_delays_only_its_own_request(server, files, tiny_dir, other_adapter):
    """While one request's lora_weights trickles in over TRICKLE_S seconds, other requests stream at their
    normal speed: the download runs in that request's own thread, not on the torch thread they all share."""

    expected = reference(tiny_dir, other_adapter)
    url = files.add("/trickle.tgz", tar_bytes(other_adapter), Fault(trickle=TRICKLE_S))
    others = [{**REQUEST, "adapter": "medical"}, {**REQUEST, "adapter": "none"}, {**REQUEST, "adapter": "medical"}]

    def round_of_others() -> tuple[float, float]:
        """(slowest time to first chunk, total) for the other requests, one after another."""
        started, first = time.monotonic(), []
        for inputs in others:
            sent = time.monotonic()
            out = send(server, inputs, stream=True, on_event=lambda event, data, out: out.setdefault(
                "first", time.monotonic()) if event == "output" else None)
            assert out["result"]["status"] == "succeeded", out["result"]
            first.append(out["first"] - sent)
        return max(first), time.monotonic() - started

    round_of_others()  # warm
    baseline = round_of_others()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        slow = pool.submit(send, server, {**REQUEST, "lora_weights": url})
        while files.count("/trickle.tgz", "GET") == 0 and time.monotonic() - started < 30:
            time.sleep(0.05)
        during = round_of_others()
        assert not slow.done(), "the trickled request ended before the others: the test shows nothing"
        result = slow.result()
    slow_seconds = time.monotonic() - started
    assert result["result"]["status"] == "succeeded", result["result"]
    assert result["result"]["output"] and "".join(result["result"]["output"]) == expected
    assert slow_seconds >= TRICKLE_S * 0.8
    print(f"others alone {baseline}, beside the trickle {during} (first chunk, total s); trickled {slow_seconds:.1f} s")
    first, total = during
    assert first < 3 * baseline[0] + 1.0, (during, baseline)
    assert total < 3 * baseline[1] + 2.0 < TRICKLE_S, (during, baseline)


def test_a_server_without_allow_private_urls_refuses_loopback_urls_and_local_paths(files, tiny_dir, tmp_path):
    env = {**tiny_env(tiny_dir), "IDEFICS_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop(ALLOW_PRIVATE, None)
    files.reset_counts()
    with CogServer(env={**env, ALLOW_PRIVATE: "0"}) as plain:
        assert re.search(r"lora_weights: http://127\.0\.0\.1:\d+/other\.tgz: only https URLs are fetched \(set "
                         r"IDEFICS_ALLOW_PRIVATE_URLS=1", failure(plain, lora_weights=files.url("/other.tgz")))
        https = files.url("/other.tgz").replace("http://", "https://")
        assert re.search(r"resolves to a loopback, private or link-local address \(127\.0\.0\.1\); only public "
                         r"addresses are fetched", failure(plain, lora_weights=https))
        # weights/tiny exists on this server (relative to its working directory): for a request it is a hub id.
        error = failure(plain, lora_weights="weights/tiny")
        assert re.search(r"lora_weights: Hugging Face repo weights/tiny@main is not in the cache \(<cache>/", error), error
        assert str(tmp_path) not in error and str(tiny_dir) not in error
    assert files.requests == []
