"""Adapters on the live model (serving/adapters.py), on the tiny model: switching, scaling, rollback of a failed
load, the shared base never changed (quantized bases: tests/model/test_loading.py)."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from idefics_cog.adapters.checks import check_adapter, layer_shapes
from idefics_cog.errors import AdapterError, InputError
from idefics_cog.serving.adapters import Adapters
from tests.support.engine import answer
from tests.support.helpers import adapter_copy, adapter_with_config
from tests.support.hostile import not_finite, shared_digest


@pytest.fixture
def with_medical(fresh, tiny_dir, tmp_path):
    adapters = Adapters(fresh, tmp_path)
    adapters.load_default(str(tiny_dir / "adapter"))
    return fresh, adapters


@pytest.mark.slow
def test_switching_gives_the_same_answers_as_loading_each_alone(with_medical, alone):
    engine, adapters = with_medical
    assert alone["medical"] != alone["none"]
    for choice in ["medical", "none", "medical", "none", "medical"]:
        assert adapters.select(choice) == choice
        assert answer(engine) == alone[choice], choice


@pytest.mark.slow
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


def rewrite_tensors(adapter, change):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file(change(tensors), path)


def damaged_adapter(tiny_dir, tmp_path):
    """Fits the base model, but its config says r=8 while its matrices have rank 16."""
    adapter = adapter_copy(tiny_dir / "adapter", tmp_path / "damaged")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    return adapter


def test_matrices_of_another_rank_than_the_config_are_refused_before_loading(with_medical, tiny_dir, tmp_path):
    engine, adapters = with_medical
    with pytest.raises(AdapterError, match=r"LoRA matrices have rank 16 and 16, but adapter_config.json makes it 8"):
        adapters._load(damaged_adapter(tiny_dir, tmp_path), "broken")
    assert adapters.names == ["medical"]


@pytest.fixture
def fails_half_way(monkeypatch):
    """Loading fails once PEFT has made the new layers and the matrices were copied in."""
    from idefics_cog.serving import adapters as module

    copy = module.load_lora_matrices

    def copy_then_fail(model, path, name):
        copy(model, path, name)
        raise RuntimeError("injected after the copy")

    monkeypatch.setattr(module, "load_lora_matrices", copy_then_fail)


@pytest.mark.slow
def test_failed_load_leaves_the_model_as_it_was(with_medical, tiny_dir, tmp_path, alone, fails_half_way):
    engine, adapters = with_medical
    with pytest.raises(AdapterError, match="could not be loaded"):
        adapters._load(adapter_copy(tiny_dir / "adapter", tmp_path / "copy"), "broken")
    assert adapters.names == ["medical"]
    for choice in ["medical", "none"]:
        adapters.select(choice)
        assert answer(engine) == alone[choice]


@pytest.mark.slow
def test_failed_first_adapter_leaves_the_plain_model(fresh, tiny_dir, tmp_path, alone, fails_half_way):
    adapters = Adapters(fresh, tmp_path)
    with pytest.raises(AdapterError):
        adapters._load(adapter_copy(tiny_dir / "adapter", tmp_path / "copy"), "broken")
    assert not isinstance(fresh.model, PeftModel)
    assert answer(fresh) == alone["none"]


def test_adapter_missing_some_matrices_is_refused_and_rolled_back(with_medical, tiny_dir, tmp_path, alone):
    engine, adapters = with_medical
    adapter = adapter_copy(tiny_dir / "adapter", tmp_path / "copy")
    dropped = sorted(k for k in load_file(adapter / "adapter_model.safetensors") if "lora_B" in k)[0]
    rewrite_tensors(adapter, lambda t: {k: v for k, v in t.items() if k != dropped})
    with pytest.raises(AdapterError, match=r"lacks 1 of the \d+ LoRA matrices .* \(first: [\w.]+\.lora_B\)"):
        adapters._load(adapter, "partial")
    assert adapters.names == ["medical"]
    adapters.select("medical")
    assert answer(engine) == alone["medical"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_matrices_that_are_not_finite_are_refused_and_the_model_is_untouched(with_medical, tiny_dir, tmp_path,
                                                                              alone):
    engine, adapters = with_medical
    digest = shared_digest(engine.model)
    adapter = adapter_copy(tiny_dir / "adapter", tmp_path / "nan", tensors=not_finite)
    with pytest.raises(InputError, match="holds values that are not finite"):
        adapters.select(lora_weights=str(adapter), allow_local=True)
    assert adapters.names == ["medical"] and shared_digest(engine.model) == digest
    adapters.select("medical")
    assert answer(engine) == alone["medical"]


@pytest.mark.slow
def test_a_hostile_adapter_never_changes_what_every_request_shares(fresh, tiny_dir, tmp_path, alone):
    """On a model without a default adapter (the first custom one wraps it), each hostile adapter in turn: refused,
    the shared tensors bit-identical, the base's answer unchanged, and a good adapter still loads."""
    adapters = Adapters(fresh, tmp_path / "cache")
    digest = shared_digest(fresh.model)
    hostile = [{"kasa_config": {}}, {"use_dora": True}, {"target_modules": ["q_proj", "k_proj", "v_proj", "lm_head"]},
               {"init_lora_weights": "pissa", "kasa_config": {}}, {"rank_pattern": {"q_proj": 4_000_000}}]
    for number, config in enumerate(hostile):
        adapter = adapter_copy(tiny_dir / "adapter", tmp_path / f"h{number}", config)
        with pytest.raises(InputError):
            adapters.select(lora_weights=str(adapter), allow_local=True)
        assert shared_digest(fresh.model) == digest, config
        adapters.select("none")
        assert answer(fresh) == alone["none"]
    adapters.select(lora_weights=str(adapter_copy(tiny_dir / "adapter", tmp_path / "good")), allow_local=True)
    assert answer(fresh) == alone["medical"]


@pytest.mark.slow
def test_pattern_keys_are_matched_as_peft_matches_them_and_loaded_at_their_ranks(tiny_dir, tmp_path, fresh, alone):
    """rank_pattern and alpha_pattern, resolved here per module (PEFT's `(.*\\.)?(key)$`), and handed to PEFT as
    one pattern of exact names per value: the layers get those ranks and scalings."""
    def half_rank_on_v(tensors):
        return {k: (v[:8] if ".lora_A." in k else v[:, :8]).contiguous() if "v_proj" in k else v
                for k, v in tensors.items()}

    adapter = adapter_copy(tiny_dir / "adapter", tmp_path / "a", {"rank_pattern": {"v_proj": 8},
                                                                   "alpha_pattern": {"self_attn.q_proj": 64}},
                           half_rank_on_v)
    config = check_adapter(adapter, layer_shapes(fresh.model))
    assert list(config.rank_pattern.values()) == [8] and list(config.alpha_pattern.values()) == [64]
    adapters = Adapters(fresh, tmp_path / "cache")
    name = adapters.select(lora_weights=str(adapter), allow_local=True)
    layers = {path: module for path, module in fresh.model.named_modules() if hasattr(module, "lora_A")}
    for path, module in layers.items():
        rank = 8 if path.endswith("v_proj") else 16
        alpha = 64 if path.endswith("self_attn.q_proj") else 32
        assert module.r[name] == rank and module.scaling[name] == alpha / rank, path
