import hashlib
import json

import pytest
import torch
from peft import PeftModel
from transformers import IdeficsForVisionText2Text

from idefics_dev import tiny
from idefics_cog.serving.engine import Engine
from idefics_cog.model.tokenizer import load_tokenizer
from idefics_cog.config import ROOT
from tests.support.helpers import noise_image
from tests.support.engine import CASES, recipe, run


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_build_is_deterministic(tiny_dir, tmp_path):
    again = tiny.build(tmp_path / "again")
    assert digest(again / "base") == digest(tiny_dir / "base")
    assert digest(again / "adapter")["adapter_model.safetensors"] == digest(tiny_dir / "adapter")["adapter_model.safetensors"]


def test_tokenizer_has_the_idefics_special_tokens_after_the_base_vocabulary(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir / "base")
    config = json.loads((tiny_dir / "base" / "config.json").read_text())
    ids = tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<end_of_utterance>"])
    assert ids == [config["vocab_size"], config["vocab_size"] + 1, config["vocab_size"] + 2]
    assert config["additional_vocab_size"] == 3
    text = "User: a chest X-ray?\nAssistant:"
    ids = tokenizer(text)["input_ids"]  # like the real tokenizer, it adds <s> unless told not to
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_every_linear_width_is_a_multiple_of_64(tiny_dir):
    model = IdeficsForVisionText2Text.from_pretrained(tiny_dir / "base")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.in_features % 64 == 0 for m in linears)
    assert all(m.out_features % 64 == 0 for m in linears if m is not model.lm_head.additional_fc)


def test_images_change_the_logits(engine):
    from idefics_cog.inputs.prompt import build_segments
    from tests.support.helpers import noise_image

    segments = build_segments("Describe it.", 1)
    logits = []
    for seed in (0, 1):
        inputs = engine.encode(segments, [noise_image(seed)]).to(engine.device, engine.dtype)
        with torch.no_grad():
            logits.append(engine.model(**inputs).logits[0, -1])
    assert (logits[0] - logits[1]).abs().max() > 1e-2


@pytest.mark.slow
def test_adapter_is_standard_peft_and_changes_the_output(tiny_dir, engine):
    adapter = tiny_dir / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32 and sorted(config["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    base = IdeficsForVisionText2Text.from_pretrained(tiny_dir / "base")
    adapted = Engine(PeftModel.from_pretrained(base, adapter).eval(), engine.processor, engine.device)
    for text, images in CASES.values():
        assert run(adapted, text, images, max_new_tokens=16) != run(engine, text, images, max_new_tokens=16)


@pytest.fixture(scope="module")
def bench_small_dir():
    """The bench-small preset, built once under weights/ (where bench/speed.py looks for it)."""
    return tiny.build(ROOT / "weights" / "bench-small", "bench-small")


def test_bench_small_has_the_tiny_tokenizer_and_a_224_px_vision_tower(bench_small_dir, tiny_dir):
    base = bench_small_dir / "base"
    assert digest(base)["tokenizer.json"] == digest(tiny_dir / "base")["tokenizer.json"]
    config = json.loads((base / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 224
    assert config["num_hidden_layers"] % config["cross_layer_interval"] == 0
    model = IdeficsForVisionText2Text.from_pretrained(base)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head.additional_fc]
    assert all(m.in_features % 64 == 0 and m.out_features % 64 == 0 for m in linears)


@pytest.mark.slow
def test_bench_small_generates_the_recipe_tokens(bench_small_dir):
    engine = Engine.load(bench_small_dir / "base", "cpu")
    text, images = "What does this X-ray show?", [noise_image(1, (224, 224))]
    expected, expected_ids = recipe(engine, text, images, max_new_tokens=12)
    assert run(engine, text, images, max_new_tokens=12) == expected
    assert engine.last_stats.ids == expected_ids and len(expected_ids) > 0
