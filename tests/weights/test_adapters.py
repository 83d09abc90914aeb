"""Adapters on the tiny model: validation, switching, scaling, rollback, caches (quantized bases: test_quantized.py)."""

import json
import os
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from idefics_cog.weights.adapters import Adapters
from idefics_cog.errors import AdapterError
from idefics_cog.weights.lora import check_adapter, linear_shapes
from tests.support.helpers import adapter_with_config
from tests.support.engine import answer


@pytest.fixture
def with_medical(fresh, tiny_dir, tmp_path):
    adapters = Adapters(fresh, tmp_path)
    adapters.load_default(str(tiny_dir / "adapter"))
    return fresh, adapters


def copy_adapter(tiny_dir, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(tiny_dir / "adapter", target)
    return target


def test_switching_gives_the_same_answers_as_loading_each_alone(with_medical, alone):
    engine, adapters = with_medical
    assert alone["medical"] != alone["none"]
    for choice in ["medical", "none", "medical", "none", "medical"]:
        assert adapters.select(choice) == choice
        assert answer(engine) == alone[choice], choice


def test_lora_scale_zero_is_the_base_and_one_is_the_adapter(with_medical, alone):
    engine, adapters = with_medical
    adapters.select("medical", lora_scale=0.0)
    assert answer(engine) == alone["none"]
    adapters.select("medical", lora_scale=2.0)
    doubled = answer(engine)
    adapters.select("medical", lora_scale=1.0)
    assert answer(engine) == alone["medical"] and doubled != alone["medical"]


def test_without_a_default_adapter_medical_serves_the_base(fresh, tmp_path, alone):
    adapters = Adapters(fresh, tmp_path)
    assert adapters.select("medical") == "none"
    assert answer(fresh) == alone["none"]


def test_the_standard_layout_passes(tiny_dir, fresh):
    config = check_adapter(tiny_dir / "adapter", linear_shapes(fresh.model))
    assert config.r == 16


def test_pickled_adapter_is_refused(tiny_dir, tmp_path, fresh):
    adapter = copy_adapter(tiny_dir, tmp_path)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"pickled weights \(adapter_model.bin\) are refused"):
        check_adapter(adapter, linear_shapes(fresh.model))


def test_missing_config_and_other_peft_types_are_refused(tiny_dir, tmp_path, fresh):
    adapter = copy_adapter(tiny_dir, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="only LoRA adapters"):
        check_adapter(adapter, linear_shapes(fresh.model))
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        check_adapter(adapter, linear_shapes(fresh.model))


def rewrite_tensors(adapter, change):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file(change(tensors), path)


def test_adapter_for_other_modules_is_refused(tiny_dir, tmp_path, fresh):
    adapter = copy_adapter(tiny_dir, tmp_path)
    rewrite_tensors(adapter, lambda t: {k.replace("layers.0.", "layers.7."): v for k, v in t.items()})
    with pytest.raises(AdapterError, match=r"targets model\.[\w.]+\.7\.[\w.]+_proj, which the base model does not have"):
        check_adapter(adapter, linear_shapes(fresh.model))


def test_adapter_with_other_shapes_is_refused(tiny_dir, tmp_path, fresh):
    adapter = copy_adapter(tiny_dir, tmp_path)
    rewrite_tensors(adapter, lambda t: {k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v
                                        for k, v in t.items()})
    with pytest.raises(AdapterError, match=r"lora_A\.weight has shape \[16, 128\], which does not fit"):
        check_adapter(adapter, linear_shapes(fresh.model))


def damaged_adapter(tiny_dir, tmp_path):
    """Fits the base model, but its config says r=8 while its matrices have rank 16: PEFT fails half-way."""
    adapter = copy_adapter(tiny_dir, tmp_path, "damaged")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    return adapter


def test_failed_load_leaves_the_model_as_it_was(with_medical, tiny_dir, tmp_path, alone):
    engine, adapters = with_medical
    with pytest.raises(AdapterError, match="could not be loaded"):
        adapters._load(damaged_adapter(tiny_dir, tmp_path), "broken")
    assert adapters.names == ["medical"]
    for choice in ["medical", "none"]:
        adapters.select(choice)
        assert answer(engine) == alone[choice]


def test_failed_first_adapter_leaves_the_plain_model(fresh, tiny_dir, tmp_path, alone):
    adapters = Adapters(fresh, tmp_path)
    with pytest.raises(AdapterError):
        adapters._load(damaged_adapter(tiny_dir, tmp_path), "broken")
    assert not isinstance(fresh.model, PeftModel)
    assert answer(fresh) == alone["none"]


def test_disk_cache_drops_the_least_recently_used_beyond_its_budget(fresh, tmp_path):
    adapters = Adapters(fresh, tmp_path, cache_bytes=2500)
    for age, name in enumerate(["old", "middle", "new"]):
        entry = adapters.cache_dir / name
        entry.mkdir(parents=True)
        (entry / "weights").write_bytes(b"x" * 1000)
        (entry / ".last_used").touch()
        os.utime(entry / ".last_used", (1000 + age, 1000 + age))
    adapters._trim_disk_cache(keep=adapters.cache_dir / "old")  # the one in use stays, whatever its age
    assert sorted(p.name for p in adapters.cache_dir.iterdir()) == ["new", "old"]


def test_adapter_missing_some_matrices_is_refused_and_rolled_back(with_medical, tiny_dir, tmp_path, alone):
    engine, adapters = with_medical
    adapter = copy_adapter(tiny_dir, tmp_path)
    dropped = sorted(k for k in load_file(adapter / "adapter_model.safetensors") if "lora_B" in k)[0]
    rewrite_tensors(adapter, lambda t: {k: v for k, v in t.items() if k != dropped})
    with pytest.raises(AdapterError, match=r"lacks 1 of the \d+ LoRA matrices .* \(first: [\w.]+\.lora_B\)"):
        adapters._load(adapter, "partial")
    assert adapters.names == ["medical"]
    adapters.select("medical")
    assert answer(engine) == alone["medical"]


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian"])
def test_an_adapters_init_setting_never_touches_the_shared_base(with_medical, tiny_dir, tmp_path, alone, init):
    """PEFT's PiSSA and OLoRA initialisations rewrite the base layers' weights: a request's adapter must not
    change what every other request runs on. Its matrices come from its file, so nothing is initialised."""
    engine, adapters = with_medical
    before = {name: p.detach().clone() for name, p in engine.model.named_parameters() if "lora_" not in name}
    adapter = adapter_with_config(tiny_dir / "adapter", tmp_path / init, init_lora_weights=init)
    assert adapters.select(lora_weights=str(adapter), allow_local=True).startswith("custom_")
    assert answer(engine) == alone["medical"]  # the same matrices as the tiny adapter
    after = {name: p for name, p in engine.model.named_parameters() if "lora_" not in name}
    assert [name for name in before if not torch.equal(before[name], after[name])] == []
    for choice in ["none", "medical"]:
        adapters.select(choice)
        assert answer(engine) == alone[choice], choice


@pytest.mark.parametrize("setting, value", [("use_dora", True), ("layer_replication", [[0, 1]]),
                                            ("modules_to_save", ["lm_head"]), ("bias", "all")])
def test_settings_beyond_plain_lora_matrices_are_refused(tiny_dir, tmp_path, fresh, setting, value):
    adapter = adapter_with_config(tiny_dir / "adapter", tmp_path / setting, **{setting: value})
    with pytest.raises(AdapterError, match=f"sets {setting}.* not supported"):
        check_adapter(adapter, linear_shapes(fresh.model))
