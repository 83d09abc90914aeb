"""Cog's managed weights: a weights.lock in cog's format and target folders the tests write for the tiny model, read
by weights_lock.py directly and through the real Cog server (with a loopback hub that counts every request)."""

import hashlib
import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest

from idefics_dev.cogrunner import CogServer, ServerError
from idefics_cog.weights.weights_lock import WeightsLock, set_digest
from idefics_cog.errors import WeightsError
from tests.support.helpers import data_uri, noise_image
from tests.support.hubserver import HubServer

BASE, ADAPTER = "owner/tiny", "owner/tiny-adapter"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REQUEST = {"prompt": "What does this X-ray show?", "image": data_uri(noise_image(1)), "max_new_tokens": 16}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def lock_entry(name: str, repo: str, target, commit: str = COMMIT) -> dict:
    """One entry as `cog weights import` writes it (replicate/cog pkg/weights/lockfile, version 1). The OCI layer
    and manifest digests stand in for layers this test never builds; the files' own digests are real."""
    files = [{"path": path.relative_to(target).as_posix(), "size": path.stat().st_size,
              "digest": sha256(path.read_bytes()), "layer": sha256(b"layer")}
             for path in sorted(target.rglob("*")) if path.is_file()]
    return {"name": name, "target": str(target),
            "sources": [{"uri": f"hf://{repo}", "fingerprint": f"commit:{commit}", "include": [], "exclude": []}],
            "importedAt": "2026-11-30T00:00:00Z", "digest": sha256(b"manifest"),
            "setDigest": set_digest(SimpleNamespace(**f) for f in files),
            "size": sum(f["size"] for f in files), "sizeCompressed": sum(f["size"] for f in files), "files": files,
            "layers": [{"digest": sha256(b"layer"), "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "size": sum(f["size"] for f in files), "sizeUncompressed": sum(f["size"] for f in files)}]}


def write_lock(path, *entries) -> str:
    path.write_text(json.dumps({"version": 1, "envelopeFormat": sha256(b"envelope"), "weights": list(entries)},
                               indent=2))
    return str(path)


@pytest.fixture
def mounted(tiny_dir, tmp_path):
    """The tiny base and adapter copied where Cog would mount them, and a weights.lock naming both."""
    targets = {name: tmp_path / "mounts" / name for name in ("base", "adapter")}
    for name, target in targets.items():
        shutil.copytree(tiny_dir / name, target)
    lock = write_lock(tmp_path / "weights.lock", lock_entry("idefics-tiny", BASE, targets["base"]),
                      lock_entry("idefics-tiny-adapter", ADAPTER, targets["adapter"]))
    return {"lock": lock, "cache": tmp_path / "cache", **targets}


def read(mounted) -> WeightsLock:
    return WeightsLock.read(mounted["lock"], mounted["cache"])


def flip_a_byte(path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_matching_target_is_used_and_verified_once(mounted):
    lock = read(mounted)
    assert lock.source_for("IDEFICS_BASE_WEIGHTS", BASE) == str(mounted["base"])
    assert lock.source_for("IDEFICS_ADAPTER_WEIGHTS", ADAPTER) == str(mounted["adapter"])
    assert lock.refused == {}
    marker = json.loads((mounted["cache"] / "managed-verified" / "idefics-tiny.json").read_text())
    assert set(marker["files"]) == {p.name for p in mounted["base"].iterdir()}


def test_the_lock_format_is_cogs():
    """The shape of replicate/cog's examples/experimental/resnet-managed-weights/weights.lock, and its setDigest
    (weightsource.DirHash: sha256 of the sorted "<hex>  <path>" lines)."""
    files = [SimpleNamespace(path="model.safetensors", digest="sha256:" + "b" * 64),
             SimpleNamespace(path="config.json", digest="sha256:" + "a" * 64)]
    lines = f"{'a' * 64}  config.json\n{'b' * 64}  model.safetensors"
    assert set_digest(files) == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("damage, says", [
    (lambda t: flip_a_byte(t / "model.safetensors"), r"model\.safetensors has sha256 sha256:[0-9a-f]{64}, the lock"),
    (lambda t: (t / "config.json").write_text("{}"), r"config\.json is 2 bytes, the lock says \d+"),
    (lambda t: (t / "config.json").unlink(), r"config\.json is missing"),
    (lambda t: (t / "extra.safetensors").write_bytes(b"x"), r"extra\.safetensors is a weight file the lock does not"),
])
def test_a_target_that_does_not_match_is_not_used_and_the_file_is_named(mounted, damage, says):
    damage(mounted["base"])
    lock = read(mounted)
    assert lock.source_for("IDEFICS_BASE_WEIGHTS", BASE) == BASE  # resolved as without a lock: downloaded
    assert re.search(says, lock.refused["IDEFICS_BASE_WEIGHTS"]), lock.refused
    assert str(mounted["base"]) in lock.refused["IDEFICS_BASE_WEIGHTS"]


def test_the_marker_spares_hashing_a_file_unchanged_since_but_not_one_rewritten(mounted):
    model = mounted["base"] / "model.safetensors"
    assert read(mounted).source_for("IDEFICS_BASE_WEIGHTS", BASE) == str(mounted["base"])
    # Same size and mtime as verified: trusted without reading it (what spares a warm start hashing 18 GB) ...
    state = model.stat()
    flip_a_byte(model)
    os.utime(model, ns=(state.st_atime_ns, state.st_mtime_ns))
    assert read(mounted).source_for("IDEFICS_BASE_WEIGHTS", BASE) == str(mounted["base"])
    # ... but a file written since is hashed again, and refused.
    os.utime(model, ns=(state.st_atime_ns, state.st_mtime_ns + 1_000_000))
    lock = read(mounted)
    assert lock.source_for("IDEFICS_BASE_WEIGHTS", BASE) == BASE
    assert "model.safetensors has sha256" in lock.refused["IDEFICS_BASE_WEIGHTS"]


@pytest.mark.parametrize("setting, uses_target", [
    (BASE, True),
    (f"{BASE}@{COMMIT}", True),  # the lock's commit
    (f"{BASE}@main", True),  # the ref the lock's uri follows (none: main)
    (f"{BASE}@{'f' * 40}", False),  # another commit pinned: downloaded as asked
    (f"{BASE}@v2", False),
    ("owner/other", False),
])
def test_a_setting_uses_the_target_of_its_repo_at_the_locked_revision(mounted, setting, uses_target):
    assert read(mounted).source_for("IDEFICS_BASE_WEIGHTS", setting) == (str(mounted["base"]) if uses_target
                                                                         else setting)


def test_local_directories_urls_no_lock_and_unmounted_targets_resolve_as_usual(mounted, tiny_dir, tmp_path):
    lock = read(mounted)
    assert lock.source_for("IDEFICS_BASE_WEIGHTS", str(tiny_dir / "base")) == str(tiny_dir / "base")
    assert lock.source_for("IDEFICS_BASE_WEIGHTS", "https://example.com/a.tar") == "https://example.com/a.tar"
    assert WeightsLock.read(tmp_path / "absent.lock", tmp_path).source_for("IDEFICS_BASE_WEIGHTS", BASE) == BASE
    shutil.rmtree(mounted["base"])
    assert read(mounted).source_for("IDEFICS_BASE_WEIGHTS", BASE) == BASE


def test_a_lock_whose_set_digest_disagrees_with_its_files_is_not_trusted(mounted):
    data = json.loads(open(mounted["lock"]).read())
    data["weights"][0]["files"][0]["digest"] = "sha256:" + "0" * 64
    write_lock(mounted["cache"].parent / "weights.lock", *data["weights"])
    lock = read(mounted)
    assert lock.source_for("IDEFICS_BASE_WEIGHTS", BASE) == BASE
    assert "setDigest" in lock.refused["IDEFICS_BASE_WEIGHTS"]


@pytest.mark.parametrize("text, says", [
    ('{"version": 2, "weights": []}', r"unsupported weights.lock version 2"),
    ("not json", r"not a readable weights.lock"),
    ('{"version": 1, "weights": [{"name": "x"}]}', r"malformed weights.lock entry \(KeyError"),
])
def test_a_bad_lock_fails_naming_the_file(tmp_path, text, says):
    (tmp_path / "weights.lock").write_text(text)
    with pytest.raises(WeightsError, match=rf"weights.lock: [\s\S]*{says}"):
        WeightsLock.read(tmp_path / "weights.lock", tmp_path)


def test_a_lock_file_path_that_leaves_its_target_is_refused(mounted, tmp_path):
    entry = json.loads(open(mounted["lock"]).read())["weights"][0]
    entry["files"][0]["path"] = "../../etc/passwd"
    write_lock(tmp_path / "weights.lock", entry)
    with pytest.raises(WeightsError, match=r"weights.lock: malformed [\s\S]*'\.\./\.\./etc/passwd' leaves its target"):
        read(mounted)


# -- through the real Cog server ---------------------------------------------------------------------------------

@pytest.fixture
def hub(tiny_dir):
    """A loopback hub that holds both repos, so any fallback to the download path would show in its counts."""
    with HubServer({BASE: {"main": tiny_dir / "base"}, ADAPTER: {"main": tiny_dir / "adapter"}}) as running:
        yield running


def managed_env(mounted, hub, **extra) -> dict:
    return {"IDEFICS_BASE_WEIGHTS": BASE, "IDEFICS_ADAPTER_WEIGHTS": ADAPTER, "IDEFICS_WEIGHTS_LOCK": mounted["lock"],
            "IDEFICS_CACHE_DIR": str(mounted["cache"]), "HF_ENDPOINT": hub.url, **extra}


def answer(server) -> str:
    result = server.predict({**REQUEST, "adapter": "medical"})
    assert result["status"] == "succeeded", result
    return "".join(result["output"])


@pytest.mark.server
def test_a_server_whose_targets_match_the_lock_loads_them_without_any_request(server, mounted, hub):
    with CogServer(env=managed_env(mounted, hub)) as managed:
        assert answer(managed) == answer(server)  # the tiny base with the tiny adapter, as from local folders
        logs = managed.health()["setup"]["logs"]
    assert hub.total_requests() == 0
    assert f"using the managed weights 'idefics-tiny' mounted at {mounted['base']}" in logs
    assert f"using the managed weights 'idefics-tiny-adapter' mounted at {mounted['adapter']}" in logs


@pytest.mark.server
def test_a_server_with_a_mismatching_file_downloads_instead_and_names_it(server, mounted, hub):
    flip_a_byte(mounted["base"] / "model.safetensors")
    with CogServer(env=managed_env(mounted, hub)) as fallback:
        assert answer(fallback) == answer(server)  # the hub's good copy, never the flipped one
        logs = fallback.health()["setup"]["logs"]
    assert ("GET", "model.safetensors") in hub.file_requests(BASE)
    assert "model.safetensors has sha256" in logs and "not loading it" in logs
    assert hub.file_requests(ADAPTER) == []  # the adapter's target matched: still used


@pytest.mark.server
def test_offline_a_mismatching_file_fails_setup_naming_it(mounted, hub):
    flip_a_byte(mounted["base"] / "model.safetensors")
    server = CogServer(env=managed_env(mounted, hub, HF_HUB_OFFLINE="1"))
    try:
        with pytest.raises(ServerError, match=r"SETUP_FAILED[\s\S]*IDEFICS_BASE_WEIGHTS=owner/tiny: [\s\S]*"
                                              r"does not match weights.lock: model.safetensors has sha256"):
            server.start()
    finally:
        server.stop()
    assert hub.total_requests() == 0
