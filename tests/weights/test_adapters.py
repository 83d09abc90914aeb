"""Adapters on the tiny model: validation, switching, scaling, rollback, caches (quantized bases: test_quantized.py)."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from idefics_cog.serving.adapters import Adapters
from idefics_cog.errors import AdapterError, InputError
from idefics_cog.weights.adapter_files import DEFAULTS, check_adapter, check_values, layer_shapes
from tests.support.helpers import adapter_copy, adapter_with_config
from tests.support.engine import answer
from tests.support.hostile import not_finite, settings_beyond_plain_lora, shared_digest, with_layer


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
    config = check_adapter(tiny_dir / "adapter", layer_shapes(fresh.model))
    assert config.r == 16


def test_pickled_adapter_is_refused(tiny_dir, tmp_path, fresh):
    adapter = copy_adapter(tiny_dir, tmp_path)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"pickled weights \(adapter_model.bin\) are refused"):
        check_adapter(adapter, layer_shapes(fresh.model))


def test_missing_config_and_other_peft_types_are_refused(tiny_dir, tmp_path, fresh):
    adapter = copy_adapter(tiny_dir, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="only LoRA adapters"):
        check_adapter(adapter, layer_shapes(fresh.model))
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        check_adapter(adapter, layer_shapes(fresh.model))


def rewrite_tensors(adapter, change):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file(change(tensors), path)


def test_adapter_for_other_modules_is_refused(tiny_dir, tmp_path, fresh):
    adapter = copy_adapter(tiny_dir, tmp_path)
    rewrite_tensors(adapter, lambda t: {k.replace("layers.0.", "layers.7."): v for k, v in t.items()})
    with pytest.raises(AdapterError, match=r"targets model\.[\w.]+\.7\.[\w.]+_proj, which the base model does not have"):
        check_adapter(adapter, layer_shapes(fresh.model))


def test_adapter_with_other_shapes_is_refused(tiny_dir, tmp_path, fresh):
    adapter = copy_adapter(tiny_dir, tmp_path)
    rewrite_tensors(adapter, lambda t: {k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v
                                        for k, v in t.items()})
    with pytest.raises(AdapterError, match=r"lora_A\.weight has shape \[16, 128\], which does not fit"):
        check_adapter(adapter, layer_shapes(fresh.model))


def damaged_adapter(tiny_dir, tmp_path):
    """Fits the base model, but its config says r=8 while its matrices have rank 16."""
    adapter = copy_adapter(tiny_dir, tmp_path, "damaged")
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


def test_failed_load_leaves_the_model_as_it_was(with_medical, tiny_dir, tmp_path, alone, fails_half_way):
    engine, adapters = with_medical
    with pytest.raises(AdapterError, match="could not be loaded"):
        adapters._load(copy_adapter(tiny_dir, tmp_path), "broken")
    assert adapters.names == ["medical"]
    for choice in ["medical", "none"]:
        adapters.select(choice)
        assert answer(engine) == alone[choice]


def test_failed_first_adapter_leaves_the_plain_model(fresh, tiny_dir, tmp_path, alone, fails_half_way):
    adapters = Adapters(fresh, tmp_path)
    with pytest.raises(AdapterError):
        adapters._load(copy_adapter(tiny_dir, tmp_path), "broken")
    assert not isinstance(fresh.model, PeftModel)
    assert answer(fresh) == alone["none"]


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
        check_adapter(adapter, layer_shapes(fresh.model))


# --- hostile configs and matrices: refused before anything touches the model -------------------------------------


@pytest.mark.parametrize("setting, value", sorted(settings_beyond_plain_lora().items()))
def test_every_setting_beyond_plain_lora_is_refused_by_name(tiny_dir, tmp_path, fresh, setting, value):
    """Generated from PEFT's own fields: each at a value other than its default (KaSA's `{}` truncated the shared
    weights by SVD when the adapter was added)."""
    adapter = adapter_with_config(tiny_dir / "adapter", tmp_path / "a", **{setting: value})
    with pytest.raises(AdapterError, match=f"adapter_config.json sets {setting}, which is not supported"):
        check_adapter(adapter, layer_shapes(fresh.model))


def test_settings_at_their_defaults_are_accepted(tiny_dir, tmp_path, fresh):
    """A config written by any PEFT version lists its fields at their defaults: that is leaving them out."""
    adapter = adapter_with_config(tiny_dir / "adapter", tmp_path / "a", **{key: value for key, value in DEFAULTS.items()
                                                                           if not isinstance(value, dict) or value})
    assert check_adapter(adapter, layer_shapes(fresh.model)).r == 16


@pytest.mark.parametrize("config, tensors, message", [
    ({"target_modules": ["q_proj", "lm_head"]}, None, r"target_modules names lm_head, which an adapter may not"),
    ({"target_modules": ["q_proj", "k_proj", "v_proj", "lm_head"]}, with_layer("lm_head", 64, 448),
     r"targets lm_head, which an adapter may not adapt here"),
    ({"target_modules": ["q_proj", "k_proj", "v_proj", "patch_embedding"]}, None,
     r"names model.vision_model.embeddings.patch_embedding, which an adapter may not"),
    ({"target_modules": ["q_proj", "k_proj", "v_proj", "embed_tokens"]}, None, r"names model.embed_tokens, which"),
    ({"target_modules": "model.*q_proj"}, None, r"target_modules as a regular expression is not supported"),
    ({"r": 4_000_000}, None, r"r=4000000 is over the limit of 64 on a LoRA rank \(IDEFICS_MAX_ADAPTER_RANK\)"),
    ({"rank_pattern": {"v_proj": 65}}, None, r"rank_pattern\['v_proj'\]=65 is over the limit of 64"),
    ({"rank_pattern": {"v_proj": 8}}, None, r"v_proj's LoRA matrices have rank 16 and 16, but adapter_config.json "
                                            r"makes it 8"),
    ({"alpha_pattern": {"(a|a)*$": 2}}, None, r"alpha_pattern key '\(a\|a\)\*\$' is not a module name"),
    ({"lora_alpha": float("inf")}, None, r"lora_alpha must be a finite number"),
    ({"lora_alpha": 10 ** 400}, None, r"lora_alpha must be a finite number from -1e\+06 to 1e\+06"),
    ({"lora_dropout": "high"}, None, r"adapter_config.json: lora_dropout is a str"),
    ({"base_model_name_or_path": {"a": 1}}, None, r"adapter_config.json: base_model_name_or_path is a dict"),
    ({"rank_pattern": {f"layers.{i}.q_proj": 16 for i in range(257)}}, None,
     r"rank_pattern must be an object of at most 256 module names"),
    (None, lambda t: {**t, **{k.replace(".lora_A.weight", ".lora_A.second.weight"): v.clone() for k, v in t.items()
                              if ".lora_A." in k}}, r"holds two lora_A matrices of model\."),
    ({"r": True}, None, r"r must be a positive integer"),
    ({"target_modules": ["q_proj", "k_proj"]}, None, r"holds [\w.]+v_proj, which is not among the target_modules"),
    (None, lambda t: {**t, next(iter(t)): t[next(iter(t))].to(torch.int32)}, r"holds I32 values"),
])
def test_hostile_configs_and_matrices_are_refused_before_loading(tiny_dir, tmp_path, fresh, config, tensors, message):
    adapter = adapter_copy(tiny_dir / "adapter", tmp_path / "a", config, tensors)
    with pytest.raises(AdapterError, match=message):
        check_adapter(adapter, layer_shapes(fresh.model))


def test_config_and_header_sizes_are_capped(tiny_dir, tmp_path, fresh):
    adapter = copy_adapter(tiny_dir, tmp_path)
    (adapter / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(AdapterError, match="not valid JSON"):
        check_adapter(adapter, layer_shapes(fresh.model))
    (adapter / "adapter_config.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(AdapterError, match="over 1048576 bytes"):
        check_adapter(adapter, layer_shapes(fresh.model))
    shutil.copy(tiny_dir / "adapter" / "adapter_config.json", adapter)
    (adapter / "adapter_model.safetensors").write_bytes((64 << 20).to_bytes(8, "little") + b"{")
    with pytest.raises(AdapterError, match="header is missing or over 8388608 bytes"):
        check_adapter(adapter, layer_shapes(fresh.model))


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
    adapters.select(lora_weights=str(copy_adapter(tiny_dir, tmp_path, "good")), allow_local=True)
    assert answer(fresh) == alone["medical"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_values_are_checked_in_every_float_type_without_torch(tiny_dir, tmp_path, dtype, bad):
    """check_values reads the file's bytes with numpy (bfloat16 by its exponent bits): it runs off the torch thread."""
    def change(tensors):
        key = sorted(tensors)[-1]
        changed = {k: v.to(dtype) for k, v in tensors.items()}
        if bad is not None:
            changed[key] = changed[key].clone()
            changed[key].view(-1)[7] = bad
        return changed

    adapter = adapter_copy(tiny_dir / "adapter", tmp_path / "a", tensors=change)
    if bad is None:
        check_values(adapter)
    else:
        with pytest.raises(AdapterError, match=r"lora_B\.weight holds values that are not finite"):
            check_values(adapter)


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


def test_a_pickled_adapter_whose_tensors_are_views_larger_than_its_data_is_refused(tiny_dir, tmp_path, fresh):
    """A stride-0 view of a one-element storage is a valid tensor of any size: copying it would allocate it all
    (an 1.8 kB adapter_model.bin grew a server by 1 GB)."""
    from idefics_cog.weights.adapter_files import load_pickled_lora

    huge = torch.zeros(1).expand(16, 1 << 20)  # 64 MB as a copy, 4 bytes of data
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": huge}, folder / "adapter_model.bin")
    assert (folder / "adapter_model.bin").stat().st_size < 5000
    with pytest.raises(AdapterError, match=r"is not a 2-D tensor laid out in its data"):
        load_pickled_lora(folder / "adapter_model.bin")
    one = torch.zeros(16, 64)
    views = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight": one for i in range(2)}
    torch.save(views, folder / "adapter_model.bin")  # two tensors of one storage: twice its data as copies
    with pytest.raises(AdapterError, match=r"its tensors are views larger than the data it holds"):
        load_pickled_lora(folder / "adapter_model.bin")

