"""Hub weight sources (`owner/name[@revision]`) through huggingface_hub, against a real loopback hub (hubserver.py).

Every request goes to 127.0.0.1 (a guard fails the test otherwise). huggingface_hub reads HF_ENDPOINT,
HF_HUB_OFFLINE and HF_HUB_DISABLE_TELEMETRY once, at import; idefics_cog.weights.hub reads the first two at each call,
which is what the tests rely on (set with monkeypatch, after the import).
"""

import logging
import os
import shutil
import socket
import time

import httpx2
import pytest
from huggingface_hub import constants
from safetensors.torch import load_file

import idefics_cog.weights.hub as hub_module
from idefics_cog.errors import WeightsError
from idefics_cog.weights.download import resolve
from tests.support.helpers import bin_adapter
from tests.support.hubserver import Fault, HubServer
from tests.support.engine import answer

REPO, ADAPTER = "owner/tiny-idefics", "owner/tiny-adapter"
WITH_PICKLE, PICKLED_ONLY = "owner/with-pickle", "owner/pickled"
ADAPTER_BIN = "owner/tiny-adapter-bin"  # published as adapter_model.bin, with a training's other pickles
BOTH_FORMATS = "owner/tiny-adapter-both"  # adapter_model.safetensors and adapter_model.bin
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@pytest.fixture(scope="module")
def repos(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    with_pickle = root / "with-pickle"
    shutil.copytree(tiny_dir / "base", with_pickle)
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (with_pickle / name).write_bytes(os.urandom(4096))
    pickled_only = root / "pickled-only"
    pickled_only.mkdir()
    shutil.copy(tiny_dir / "base" / "config.json", pickled_only)
    (pickled_only / "pytorch_model.bin").write_bytes(os.urandom(4096))
    adapter_bin = bin_adapter(tiny_dir / "adapter", root / "adapter-bin")
    for name in ("training_args.bin", "optimizer.pt", "pytorch_model.bin"):
        (adapter_bin / name).write_bytes(os.urandom(4096))
    both = root / "both"
    shutil.copytree(tiny_dir / "adapter", both)
    shutil.copy(adapter_bin / "adapter_model.bin", both)
    return {
        REPO: {"main": tiny_dir / "base", "v1": tiny_dir / "base"},
        ADAPTER: {"main": tiny_dir / "adapter"},
        WITH_PICKLE: {"main": with_pickle},
        PICKLED_ONLY: {"main": pickled_only},
        ADAPTER_BIN: {"main": adapter_bin},
        BOTH_FORMATS: {"main": both},
    }


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail the test if anything (huggingface_hub's telemetry included) tries an address other than 127.0.0.1."""
    elsewhere = []
    send = httpx2.Client.send

    def guarded(self, request, **kwargs):
        if request.url.host != "127.0.0.1":
            elsewhere.append(str(request.url))
            raise httpx2.ConnectError("the tests reach 127.0.0.1 only", request=request)
        return send(self, request, **kwargs)

    monkeypatch.setattr(httpx2.Client, "send", guarded)
    yield
    assert not elsewhere, f"requests to other addresses: {elsewhere}"


@pytest.fixture(scope="module")
def hub_server(repos):
    with HubServer(repos) as server:
        yield server


@pytest.fixture
def hub(hub_server, monkeypatch):
    """The loopback hub, without faults and with zero counts, and the environment pointing at it."""
    hub_server.reset()
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    # Import-time copies: offline when the suite was started with HF_HUB_OFFLINE=1; and the agent-registry fetch
    # that builds the user agent goes to constants.ENDPOINT (huggingface.co), not to HF_ENDPOINT.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return hub_server


@pytest.fixture
def digests(monkeypatch):
    """The files idefics_cog.weights.hub hashes, in order."""
    hashed = []
    digest = hub_module.digest

    def spy(file, algorithm):
        hashed.append(file.name)
        return digest(file, algorithm)

    monkeypatch.setattr(hub_module, "digest", spy)
    return hashed


def same_files(snapshot, directory, names):
    return {path.name for path in snapshot.iterdir()} == set(names) and all(
        (snapshot / name).read_bytes() == (directory / name).read_bytes() for name in names
    )


def lfs_path(hub, repo, name):
    return hub.cdn_path(repo, hub.file(repo, name))


@pytest.mark.slow
def test_download_load_and_warm_cache(hub, tiny_dir, tmp_path, caplog, digests):
    from idefics_cog.serving.engine import Engine

    caplog.set_level(logging.INFO, logger="idefics_cog.weights.hub")
    base = tiny_dir / "base"
    names = sorted(path.name for path in base.iterdir())
    sha = hub.sha(REPO, "main")

    path = resolve(f"{REPO}@{sha}", tmp_path)

    assert path == tmp_path / "hub" / "models--owner--tiny-idefics" / "snapshots" / sha
    assert same_files(path, base, names)
    assert hub.downloads(REPO) == {name: 1 for name in names}
    assert digests == ["model.safetensors"]
    total = sum((base / name).stat().st_size for name in names)
    assert any(f"{total} bytes" in r.getMessage() and "fetched" in r.getMessage() for r in caplog.records)

    engine = Engine.load(path, "cpu")
    assert engine.context_tokens == 512
    original = load_file(base / "model.safetensors")
    loaded = engine.model.state_dict()
    assert all((loaded[key] == tensor).all() for key, tensor in original.items() if key in loaded)

    # Warm: a pinned commit costs no request at all and hashes nothing; a branch costs only repo-info requests.
    hub.reset_counts()
    caplog.clear()
    assert resolve(f"{REPO}@{sha}", tmp_path) == path
    assert hub.total_requests() == 0
    assert resolve(f"{REPO}@main", tmp_path) == path
    assert hub.file_requests() == [] and len(hub.cdn.requests) == 0
    assert digests == ["model.safetensors"]
    assert all("0 bytes (0.0 MB) fetched" in r.getMessage() for r in caplog.records if "fetched" in r.getMessage())


def test_no_progress_bar_off_a_terminal(hub, tmp_path, capfd):
    """A server's log is no terminal: snapshot_download's "Fetching N files" bar printed two lines into it at every
    start, cold or warm."""
    resolve(f"{REPO}@main", tmp_path)
    resolve(f"{REPO}@main", tmp_path)
    assert "Fetching" not in capfd.readouterr().err


def test_pickled_weights_are_never_requested(hub, tiny_dir, tmp_path):
    path = resolve(WITH_PICKLE, tmp_path)

    assert hub.file(WITH_PICKLE, "pytorch_model.bin")  # listed by the hub
    assert same_files(path, tiny_dir / "base", [p.name for p in (tiny_dir / "base").iterdir()])
    requested = {name for _, name in hub.file_requests(WITH_PICKLE)}
    assert "model.safetensors" in requested
    assert not [name for name in requested if name.endswith(PICKLES)]


def test_a_repo_with_only_pickled_weights_is_refused(hub, tmp_path):
    with pytest.raises(WeightsError, match=r"owner/pickled@main offers only pickled weights \(pytorch_model\.bin\)"):
        resolve(PICKLED_ONLY, tmp_path)
    assert not [name for _, name in hub.file_requests() if name.endswith(PICKLES)]


def test_corrupted_bytes_are_detected_and_fetched_again(hub, tiny_dir, tmp_path, caplog):
    hub.set_fault(REPO, "model.safetensors", Fault(corrupt=True, times=1))

    path = resolve(f"{REPO}@main", tmp_path)

    assert (path / "model.safetensors").read_bytes() == (tiny_dir / "base" / "model.safetensors").read_bytes()
    assert hub.downloads(REPO)["model.safetensors"] == 2
    assert "did not match the hub's checksum" in caplog.text


def test_corrupted_twice_is_an_error_and_never_returned(hub, tiny_dir, tmp_path):
    hub.set_fault(REPO, "model.safetensors", Fault(corrupt=True, times=2))
    sha256 = hub.file(REPO, "model.safetensors").sha256

    with pytest.raises(WeightsError, match=r"owner/tiny-idefics@main: model\.safetensors does not match .*removed"):
        resolve(f"{REPO}@main", tmp_path)

    storage = tmp_path / "hub" / "models--owner--tiny-idefics"
    assert not (storage / "snapshots" / hub.sha(REPO) / "model.safetensors").exists()
    assert not [blob for blob in (storage / "blobs").iterdir() if blob.name.startswith(sha256)]
    assert hub.downloads(REPO)["model.safetensors"] == 2

    path = resolve(f"{REPO}@main", tmp_path)  # the fault is spent: the next setup gets the good file
    assert (path / "model.safetensors").read_bytes() == (tiny_dir / "base" / "model.safetensors").read_bytes()


def test_a_blob_changed_after_verification_is_hashed_again(hub, tiny_dir, tmp_path, digests):
    sha = hub.sha(REPO)
    path = resolve(f"{REPO}@{sha}", tmp_path)
    blob = (path / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))  # same size, new mtime: the marker no longer vouches for it

    assert resolve(f"{REPO}@{sha}", tmp_path) == path

    assert (path / "model.safetensors").read_bytes() == (tiny_dir / "base" / "model.safetensors").read_bytes()
    assert digests == ["model.safetensors"] * 3  # first download, the changed blob, the new download
    assert hub.downloads(REPO)["model.safetensors"] == 2


@pytest.mark.slow
def test_a_dropped_connection_is_resumed(hub, tiny_dir, tmp_path, monkeypatch):
    # huggingface_hub writes what it received in chunks of DOWNLOAD_CHUNK_SIZE (10 MB) and resumes from the last
    # whole chunk: smaller chunks here, so that a cut in this 1.5 MB file is resumed rather than started over.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 << 10)
    size = hub.file(REPO, "model.safetensors").size
    hub.set_fault(REPO, "model.safetensors", Fault(drop_after=size // 2, times=1))

    path = resolve(f"{REPO}@main", tmp_path)

    assert (path / "model.safetensors").read_bytes() == (tiny_dir / "base" / "model.safetensors").read_bytes()
    first, second = hub.cdn.ranges(lfs_path(hub, REPO, "model.safetensors"))
    assert first is None and 0 < int(second.removeprefix("bytes=").removesuffix("-")) <= size // 2


def test_not_found_names_the_repo_and_revision(hub, tmp_path):
    with pytest.raises(WeightsError, match=r"owner/missing@main .*repo not found on http://127\.0\.0\.1:\d+ \(HTTP 4"):
        resolve("owner/missing", tmp_path)
    with pytest.raises(WeightsError, match=r"owner/tiny-idefics@nope: revision 'nope' not found in owner/tiny-idefics"):
        resolve(f"{REPO}@nope", tmp_path)
    assert hub.file_requests() == []


@pytest.mark.slow
def test_a_timeout_names_the_repo_and_falls_back_on_the_cache(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")  # an int: huggingface_hub int()s it at import
    hub.set_delay(REPO, 60)
    with pytest.raises(WeightsError, match=r"tiny-idefics@main is not in the cache .*did not answer within 1 s"):
        resolve(f"{REPO}@main", tmp_path)

    hub.set_delay(REPO, 0)
    path = resolve(f"{REPO}@main", tmp_path)
    hub.set_delay(REPO, 60)
    assert resolve(f"{REPO}@main", tmp_path) == path  # the branch's commit comes from the cache's refs/


def test_offline_uses_the_cache_and_only_the_cache(hub, tmp_path, monkeypatch):
    sha = hub.sha(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in (f"{REPO}@main", f"{REPO}@{sha}"):
        with pytest.raises(WeightsError, match=rf"{source} is not in the cache .*HF_HUB_OFFLINE is set"):
            resolve(source, tmp_path)
    assert hub.total_requests() == 0

    monkeypatch.delenv("HF_HUB_OFFLINE")
    path = resolve(f"{REPO}@main", tmp_path)
    hub.reset_counts()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve(f"{REPO}@main", tmp_path) == path
    assert resolve(f"{REPO}@{sha}", tmp_path) == path
    assert hub.total_requests() == 0


def test_an_unreachable_hub_uses_the_cache(hub, tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    path = resolve(f"{REPO}@main", tmp_path / "warm")
    monkeypatch.setenv("HF_ENDPOINT", closed)

    assert resolve(f"{REPO}@main", tmp_path / "warm") == path
    with pytest.raises(WeightsError, match=r"owner/tiny-idefics@main is not in the cache .*could not be reached"):
        resolve(f"{REPO}@main", tmp_path / "cold")


def test_the_adapter_repo_downloads(hub, tiny_dir, tmp_path):
    from peft import LoraConfig

    path = resolve(ADAPTER, tmp_path)

    assert same_files(path, tiny_dir / "adapter", ["adapter_config.json", "adapter_model.safetensors"])
    assert "README.md" not in {name for _, name in hub.file_requests()}
    assert LoraConfig.from_pretrained(path).r == 16


def test_partial_files_left_by_a_killed_run_are_removed(hub, tmp_path):
    resolve(f"{REPO}@main", tmp_path)
    blobs = tmp_path / "hub" / "models--owner--tiny-idefics" / "blobs"
    stale, live = blobs / "abc.1234abcd.incomplete", blobs / "def.5678abcd.incomplete"
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"y" * 100)
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))

    resolve(f"{REPO}@main", tmp_path)

    assert not stale.exists() and live.exists()


@pytest.mark.slow
def test_an_adapter_repo_gets_its_adapter_model_bin_and_no_other_pickle(hub, repos, tmp_path, digests):
    hub.set_fault(ADAPTER_BIN, "adapter_model.bin", Fault(corrupt=True, times=1))

    path = resolve(ADAPTER_BIN, tmp_path, adapter=True)

    assert same_files(path, repos[ADAPTER_BIN]["main"], ["adapter_config.json", "adapter_model.bin"])
    assert digests == ["adapter_model.bin", "adapter_model.bin"]  # verified like safetensors: corrupt, fetched again
    requested = {name for _, name in hub.file_requests(ADAPTER_BIN)}
    assert "adapter_model.bin" in requested and not requested & {"training_args.bin", "optimizer.pt",
                                                                  "pytorch_model.bin"}
    # Not as an adapter (a base model), the same repo offers only pickles: refused, none fetched.
    with pytest.raises(WeightsError, match=r"offers only pickled weights \(adapter_model\.bin, optimizer\.pt"):
        resolve(ADAPTER_BIN, tmp_path / "as-base")
    # An adapter fetch of another repo still never asks for its pytorch_model.bin or other pickles, and an adapter
    # that has safetensors is fetched without its .bin.
    resolve(WITH_PICKLE, tmp_path / "with-pickle", adapter=True)
    assert not [name for _, name in hub.file_requests(WITH_PICKLE) if name.endswith(PICKLES)]
    both = resolve(BOTH_FORMATS, tmp_path / "both", adapter=True)
    assert {p.name for p in both.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert not [name for _, name in hub.file_requests(BOTH_FORMATS) if name.endswith(PICKLES)]
    # Warm, pinned: the .bin snapshot is taken from the cache without a request.
    hub.reset_counts()
    assert resolve(f"{ADAPTER_BIN}@{hub.sha(ADAPTER_BIN)}", tmp_path, adapter=True) == path
    assert hub.total_requests() == 0


@pytest.mark.slow
def test_a_hub_adapter_in_bin_form_serves_as_the_safetensors_one(hub, fresh, tmp_path, alone):
    from idefics_cog.serving.adapters import Adapters

    adapters = Adapters(fresh, tmp_path)
    adapters.load_default(ADAPTER_BIN)
    adapters.select("medical")
    assert answer(fresh) == alone["medical"]
    [converted] = (tmp_path / "converted").iterdir()
    assert sorted(p.name for p in converted.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # As a request's lora_weights too (converted into that adapter's own cache entry).
    name = adapters.select(lora_weights=ADAPTER_BIN)
    assert name.startswith("custom_") and answer(fresh) == alone["medical"]


def test_a_requests_hub_adapter_is_measured_first_fetched_alone_and_without_the_operators_token(
        hub, repos, tmp_path, monkeypatch):
    from idefics_cog.weights.hub import fetch_request_adapter

    monkeypatch.setenv("HF_TOKEN", "hf_operator_secret")
    # Over the limit by the repo's file metadata: refused before any file is downloaded.
    with pytest.raises(WeightsError, match=r"adapter files \(adapter_config.json, adapter_model.safetensors\) are "
                                           r"\d+ bytes, over the limit of 1000 bytes .*not downloaded"):
        fetch_request_adapter(BOTH_FORMATS, None, tmp_path / "small", max_bytes=1000)
    assert hub.downloads(BOTH_FORMATS) == {}
    # Within it: only the adapter's two files, and never the operator's token.
    path = fetch_request_adapter(BOTH_FORMATS, None, tmp_path / "fits", max_bytes=10 << 20)
    assert {p.name for p in path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert hub.downloads(BOTH_FORMATS) == {"adapter_config.json": 1, "adapter_model.safetensors": 1}
    assert hub.authorizations == []
    # The operator's own sources still use it (private repos of the operator).
    resolve(ADAPTER, tmp_path / "operator", adapter=True)
    assert hub.authorizations and all("hf_operator_secret" in value for value in hub.authorizations)


@pytest.mark.slow
def test_a_requests_hub_adapter_is_stopped_at_its_deadline_and_leaves_nothing(hub, fresh, tmp_path):
    """A total deadline on the adapter's bytes as they arrive: a CDN trickling the weights for 30 s is cut off."""
    from idefics_cog.serving.adapters import Adapters
    from idefics_cog.weights.hub import fetch_request_adapter
    from idefics_cog.errors import InputError

    hub.set_fault(ADAPTER, "adapter_model.safetensors", Fault(trickle=30.0))
    started = time.monotonic()
    with pytest.raises(WeightsError, match=r"adapter_model.safetensors: the download did not finish within its "
                                           r"deadline \(IDEFICS_ADAPTER_DOWNLOAD_SECONDS\); stopped"):
        fetch_request_adapter(ADAPTER, None, tmp_path / "slow", max_bytes=10 << 20, deadline=time.monotonic() + 1)
    assert time.monotonic() - started < 5
    assert [p.name for p in (tmp_path / "slow").iterdir()] == []  # no partial file, no half-filled commit folder
    # The server's way in: Adapters.fetch gives it IDEFICS_ADAPTER_DOWNLOAD_SECONDS, and says so to the requester.
    with pytest.raises(InputError, match=r"^lora_weights: .*did not finish within its deadline"):
        Adapters(fresh, tmp_path / "server", download_seconds=1).fetch(ADAPTER)
    assert time.monotonic() - started < 10
    hub.set_fault(ADAPTER, "adapter_model.safetensors", None)
    path = fetch_request_adapter(ADAPTER, None, tmp_path / "slow", max_bytes=10 << 20, deadline=time.monotonic() + 30)
    assert path.name == hub.sha(ADAPTER) and (path / "adapter_model.safetensors").is_file()


def test_a_requests_hub_adapter_is_checked_against_the_hubs_checksums(hub, tiny_dir, tmp_path):
    from idefics_cog.weights.hub import fetch_request_adapter

    hub.set_fault(ADAPTER, "adapter_model.safetensors", Fault(corrupt=True))
    expected = hub.file(ADAPTER, "adapter_model.safetensors").sha256
    with pytest.raises(WeightsError, match=rf"adapter_model.safetensors does not match the hub's checksum "
                                           rf"\(expected {expected}, got [0-9a-f]{{64}}\); not used"):
        fetch_request_adapter(ADAPTER, None, tmp_path / "bad", max_bytes=10 << 20)
    assert [p.name for p in (tmp_path / "bad").iterdir()] == []


def test_a_requests_hub_adapter_is_reused_and_served_offline_from_its_folder(hub, tiny_dir, tmp_path, monkeypatch):
    from idefics_cog.weights.hub import fetch_request_adapter

    first = fetch_request_adapter(ADAPTER, None, tmp_path / "entry", max_bytes=10 << 20)
    assert same_files(first, tiny_dir / "adapter", ["adapter_config.json", "adapter_model.safetensors"])
    # Online again: the commit is looked up (the branch may have moved), nothing is downloaded again.
    assert fetch_request_adapter(ADAPTER, None, tmp_path / "entry", max_bytes=10 << 20) == first
    assert hub.downloads(ADAPTER) == {"adapter_config.json": 1, "adapter_model.safetensors": 1}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset_counts()
    assert fetch_request_adapter(ADAPTER, None, tmp_path / "entry", max_bytes=10 << 20) == first
    assert hub.total_requests() == 0
    with pytest.raises(WeightsError, match=r"not in the cache .* HF_HUB_OFFLINE is set"):
        fetch_request_adapter(ADAPTER, None, tmp_path / "never", max_bytes=10 << 20)


def test_a_repo_without_adapter_files_is_refused_before_any_download(hub, tmp_path):
    from idefics_cog.weights.hub import fetch_request_adapter

    with pytest.raises(WeightsError, match=r"owner/tiny-idefics@main has no adapter_config.json and "
                                           r"adapter_model.safetensors \(a PEFT LoRA adapter"):
        fetch_request_adapter(REPO, None, tmp_path / "base", max_bytes=10 << 20)
    assert hub.downloads(REPO) == {}
