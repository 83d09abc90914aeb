"""Adapters published as adapter_model.bin: read by torch's weights-only unpickler, written once as safetensors into
the cache, answering exactly as the same adapter in safetensors; hostile, non-LoRA and other pickles refused."""

import pickle

import pytest
import torch
from safetensors.torch import load_file

from idefics_cog.serving.adapters import Adapters
from idefics_cog.serving.engine import Engine
from idefics_cog.errors import WeightsError
from tests.support.helpers import bin_adapter, hostile_adapter
from tests.support.engine import answer


def listing(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_a_bin_adapter_is_converted_once_and_answers_as_the_safetensors_one(fresh, tiny_dir, tmp_path, alone,
                                                                           caplog):
    source = bin_adapter(tiny_dir / "adapter", tmp_path / "published")
    published = listing(source)
    caplog.set_level("INFO", logger="idefics_cog.weights")
    adapters = Adapters(fresh, tmp_path / "cache")
    adapters.load_default(str(source))
    adapters.select("medical")
    assert answer(fresh) == alone["medical"] != alone["none"]
    assert listing(source) == published  # the operator's folder is never written to
    [converted] = (tmp_path / "cache" / "converted").iterdir()
    assert sorted(listing(converted)) == ["adapter_config.json", "adapter_model.safetensors"]
    original = load_file(tiny_dir / "adapter" / "adapter_model.safetensors")
    stored = load_file(converted / "adapter_model.safetensors")
    assert stored.keys() == original.keys() and all(torch.equal(stored[k], original[k]) for k in original)
    assert caplog.text.count("converted to safetensors") == 1

    # A second setup on the same cache finds the conversion.
    again = Engine.load(tiny_dir / "base", "cpu")
    Adapters(again, tmp_path / "cache").load_default(str(source))
    assert caplog.text.count("converted to safetensors") == 1
    assert answer(again) == alone["medical"]


def unpickle_unsafely(path):
    """What a plain loader would do with the file (torch.load without weights_only, or pickle)."""
    try:
        return torch.load(path, weights_only=False)
    except Exception:
        with open(path, "rb") as stream:
            return pickle.load(stream)


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch.save zip", "bare pickle"])
def test_a_hostile_pickle_is_refused_and_never_runs(fresh, tiny_dir, tmp_path, alone, torch_format):
    # The file really is hostile: unpickled the plain way, it creates its marker.
    proof = tmp_path / "proof-marker"
    unpickle_unsafely(hostile_adapter(tiny_dir / "adapter", tmp_path / "proof", proof, torch_format)
                      / "adapter_model.bin")
    assert proof.exists()

    marker = tmp_path / "marker"
    source = hostile_adapter(tiny_dir / "adapter", tmp_path / "hostile", marker, torch_format)
    adapters = Adapters(fresh, tmp_path / "cache")
    refused = (r"adapter_model\.bin is refused: torch's weights-only loader cannot read it as plain tensors "
               r"\(UnpicklingError: Unsupported global: GLOBAL \w+\.open ")
    with pytest.raises(WeightsError, match=refused):
        adapters.load_default(str(source))
    assert not marker.exists()
    assert not (tmp_path / "cache" / "converted").exists() or not any((tmp_path / "cache" / "converted").iterdir())
    assert adapters.names == [] and answer(fresh) == alone["none"]


def saved_bin(tiny_dir, folder, content, name="adapter_model.bin"):
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((tiny_dir / "adapter" / "adapter_config.json").read_bytes())
    torch.save(content, folder / name)
    return folder


def lora_tensors(tiny_dir):
    return load_file(tiny_dir / "adapter" / "adapter_model.safetensors")


BAD_BINS = {
    "a whole model": (lambda d: load_file(d / "base" / "model.safetensors"),
                      r"adapter_model\.bin is refused: unsupported tensor '[\w.]+' \(only LoRA A/B matrices"),
    "not a dict": (lambda d: torch.zeros(3), r"adapter_model\.bin is refused: it must hold a non-empty dict of LoRA "
                                             r"tensors, not Tensor"),
    "a non-tensor entry": (lambda d: {**lora_tensors(d), "step": 3},
                           r"adapter_model\.bin is refused: entry 'step' is a int, not a tensor"),
    "LoRA of another shape": (lambda d: {k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v
                                         for k, v in lora_tensors(d).items()},
                              r"lora_A\.weight has shape \[16, 128\], which does not fit"),
}


@pytest.mark.parametrize("case", BAD_BINS)
def test_a_bin_that_is_no_fitting_lora_adapter_is_refused(fresh, tiny_dir, tmp_path, alone, case):
    content, message = BAD_BINS[case]
    source = saved_bin(tiny_dir, tmp_path / "bad", content(tiny_dir))
    adapters = Adapters(fresh, tmp_path / "cache")
    with pytest.raises(WeightsError, match=message):
        adapters.load_default(str(source))
    assert adapters.names == [] and answer(fresh) == alone["none"]


@pytest.mark.parametrize("name", ["pytorch_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter.pkl"])
def test_other_pickles_stay_refused(fresh, tiny_dir, tmp_path, name):
    source = saved_bin(tiny_dir, tmp_path / "other", lora_tensors(tiny_dir), name)
    adapters = Adapters(fresh, tmp_path / "cache")
    with pytest.raises(WeightsError, match=rf"pickled weights \({name}\) are refused"):
        adapters.load_default(str(source))
    assert not (tmp_path / "cache" / "converted").exists()


def test_the_same_bin_with_another_config_is_converted_again(fresh, tiny_dir, tmp_path):
    import json

    first = bin_adapter(tiny_dir / "adapter", tmp_path / "first")
    second = bin_adapter(tiny_dir / "adapter", tmp_path / "second")
    config = json.loads((second / "adapter_config.json").read_text())
    (second / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] * 2}))
    adapters = Adapters(fresh, tmp_path / "cache", max_loaded=4)
    scaled = [adapters.select(lora_weights=str(source), allow_local=True) for source in (first, second)]
    doubled = answer(fresh)
    adapters.select(lora_weights=str(first), allow_local=True)
    assert answer(fresh) != doubled and scaled[0] != scaled[1]
    assert fresh.model.peft_config[scaled[1]].lora_alpha == 2 * fresh.model.peft_config[scaled[0]].lora_alpha
