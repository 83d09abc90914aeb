"""An adapter's files (adapters/checks.py): the PEFT layout, the config by allow-list, the matrices against the
base model, finite values, and adapter_model.bin through torch's weights-only unpickler."""

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from idefics_cog.adapters.checks import DEFAULTS, check_adapter, check_values, layer_shapes
from idefics_cog.errors import AdapterError, WeightsError
from idefics_cog.serving.adapters import Adapters
from idefics_cog.serving.engine import Engine
from tests.support.engine import answer
from tests.support.helpers import adapter_copy, adapter_with_config, bin_adapter, hostile_adapter
from tests.support.hostile import settings_beyond_plain_lora, with_layer


@pytest.mark.slow
def test_the_standard_layout_passes(tiny_dir, fresh):
    config = check_adapter(tiny_dir / "adapter", layer_shapes(fresh.model))
    assert config.r == 16


def test_pickled_adapter_is_refused(tiny_dir, tmp_path, fresh):
    adapter = adapter_copy(tiny_dir / "adapter", tmp_path / "copy")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"pickled weights \(adapter_model.bin\) are refused"):
        check_adapter(adapter, layer_shapes(fresh.model))


@pytest.mark.slow
def test_missing_config_and_other_peft_types_are_refused(tiny_dir, tmp_path, fresh):
    adapter = adapter_copy(tiny_dir / "adapter", tmp_path / "copy")
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
    adapter = adapter_copy(tiny_dir / "adapter", tmp_path / "copy")
    rewrite_tensors(adapter, lambda t: {k.replace("layers.0.", "layers.7."): v for k, v in t.items()})
    with pytest.raises(AdapterError, match=r"targets model\.[\w.]+\.7\.[\w.]+_proj, which the base model does not have"):
        check_adapter(adapter, layer_shapes(fresh.model))


def test_adapter_with_other_shapes_is_refused(tiny_dir, tmp_path, fresh):
    adapter = adapter_copy(tiny_dir / "adapter", tmp_path / "copy")
    rewrite_tensors(adapter, lambda t: {k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v
                                        for k, v in t.items()})
    with pytest.raises(AdapterError, match=r"lora_A\.weight has shape \[16, 128\], which does not fit"):
        check_adapter(adapter, layer_shapes(fresh.model))


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
    adapter = adapter_copy(tiny_dir / "adapter", tmp_path / "copy")
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


def test_a_pickled_adapter_whose_tensors_are_views_larger_than_its_data_is_refused(tiny_dir, tmp_path, fresh):
    """A stride-0 view of a one-element storage is a valid tensor of any size: copying it would allocate it all
    (an 1.8 kB adapter_model.bin grew a server by 1 GB)."""
    from idefics_cog.adapters.checks import load_pickled_lora

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


# --- adapter_model.bin: converted once, answering as the safetensors one; hostile pickles refused ---------------


def listing(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.slow
def test_a_bin_adapter_is_converted_once_and_answers_as_the_safetensors_one(fresh, tiny_dir, tmp_path, alone,
                                                                           caplog):
    source = bin_adapter(tiny_dir / "adapter", tmp_path / "published")
    published = listing(source)
    caplog.set_level("INFO", logger="idefics_cog.adapters")
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


@pytest.mark.slow
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


@pytest.mark.slow
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
