"""A version made by `cog train` (Replicate's training flow): setup gets the training's output .tar through
COG_WEIGHTS, and its adapter is the version's default in place of MedIDEFICS. Through the real Cog server, with
the tar on a loopback HTTP server."""

import tarfile

import pytest

from idefics_dev.cogrunner import CogServer, ServerError
from idefics_cog.config import ROOT
from idefics_cog.training.run import TrainConfig, train_adapter
from tests.conftest import tiny_env
from tests.support.fileserver import FileServer
from tests.support.helpers import dataset_zip, tar_bytes, vqa_lines
from tests.support.server import answer, reference


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """A short real training on the tiny model: its output .tar, and the adapter in it extracted."""
    root = tmp_path_factory.mktemp("trained")
    config = TrainConfig(max_steps=10, learning_rate=1e-2, batch_size=2, validation_fraction=0.0, seed=5,
                         device="cpu")
    result = train_adapter(dataset_zip(root / "data.zip", *vqa_lines()), str(tiny_dir / "base"), ROOT / "weights",
                           config, root / "run")
    with tarfile.open(result.tar_path) as tar:
        tar.extractall(root / "adapter", filter="data")
    return result.tar_path, root / "adapter"


@pytest.fixture(scope="module")
def files(trained, tiny_dir):
    with FileServer() as server:
        server.add("/trainings/abc/lora.tar", trained[0].read_bytes())
        server.add("/base.tgz", tar_bytes(tiny_dir / "base"))
        yield server


def version_env(tiny_dir, cache, weights: str) -> dict:
    """A version of this model made from a training: the image's settings (MedIDEFICS = the tiny adapter here),
    and COG_WEIGHTS as Replicate sets it (an operator setting: a loopback URL needs no flag there; the flag lets the
    tests' requests name loopback lora_weights URLs)."""
    return {**tiny_env(tiny_dir), "IDEFICS_CACHE_DIR": str(cache), "COG_WEIGHTS": weights,
            "IDEFICS_ALLOW_PRIVATE_URLS": "1"}


def test_a_version_made_from_a_training_serves_the_trained_adapter_by_default(files, trained, tiny_dir, tmp_path):
    expected = {"trained": reference(tiny_dir, trained[1]), "medidefics": reference(tiny_dir, tiny_dir / "adapter"),
                "none": reference(tiny_dir)}
    assert len(set(expected.values())) == 3
    url = files.url("/trainings/abc/lora.tar")
    with CogServer(env=version_env(tiny_dir, tmp_path / "cache", url)) as server:
        logs = server.health()["setup"]["logs"]
        assert "the default adapter is the trained one (COG_WEIGHTS)" in logs
        assert f"adapter 'medical' (the default) from {url}" in logs and "trained on" in logs
        assert f"from {tiny_dir / 'adapter'}" not in logs  # MedIDEFICS's stand-in is not loaded at all
        assert "was trained on" not in logs  # trained on this very base
        assert answer(server) == expected["trained"]  # no adapter input: the default
        assert answer(server, adapter="medical") == expected["trained"]
        assert answer(server, adapter="none") == expected["none"]
        # MedIDEFICS (or any adapter) stays reachable per request.
        assert answer(server, lora_weights=files.url("/trainings/abc/lora.tar"), lora_scale=0.0) == expected["none"]
    assert files.count("/trainings/abc/lora.tar", "GET") >= 1


BAD_WEIGHTS = {
    "missing": ("/trainings/gone/lora.tar", r"COG_WEIGHTS, the training's output\)[\s\S]*404"),
    "not an adapter": ("/base.tgz", r"COG_WEIGHTS, the training's output\): not a PEFT adapter"),
}


@pytest.mark.parametrize("case", BAD_WEIGHTS)
def test_bad_cog_weights_fail_setup_with_the_reason(files, tiny_dir, tmp_path, case):
    path, message = BAD_WEIGHTS[case]
    server = CogServer(env=version_env(tiny_dir, tmp_path / "cache", files.url(path)))
    try:
        with pytest.raises(ServerError, match=r"SETUP_FAILED[\s\S]*" + message):
            server.start()
    finally:
        server.stop()


def test_a_trained_adapter_recording_another_base_is_served_with_a_warning(tiny_dir, tmp_path, caplog):
    from idefics_cog.serving.service import Service
    from idefics_cog.config import Settings

    # The tiny adapter records `idefics-cog/tiny-idefics`, not the local folder this version serves.
    settings = Settings.from_env({**tiny_env(tiny_dir), "IDEFICS_CACHE_DIR": str(tmp_path)},
                                 trained_weights=str(tiny_dir / "adapter"))
    caplog.set_level("INFO")
    service = Service.from_settings(settings)
    assert service.adapters.names == ["medical"]
    assert (f"the trained adapter was trained on idefics-cog/tiny-idefics, this version serves {tiny_dir / 'base'} "
            f"(IDEFICS_BASE_WEIGHTS)") in caplog.text
    assert Settings.from_env({}, trained_weights=None).trained_weights == ""
