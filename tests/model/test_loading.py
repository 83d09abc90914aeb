"""8-bit and 4-bit (bitsandbytes) bases on CPU: adapters, answers that do not drift, and what this CPU does.

bitsandbytes 0.50.2 repacks 4-bit weights for a fused kernel at the first forward on CPUs with AVX512-BF16, and
`state_dict()` unpacks them lossily. The project never calls `state_dict()` on a serving model (adapters.py loads
LoRA matrices directly), so on every CPU: an adapter loaded at any time leaves every quantized byte as it was.
"""

import logging
import warnings
from pathlib import Path

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from peft import PeftModel
from transformers import IdeficsForVisionText2Text

from idefics_cog.serving.adapters import Adapters
from idefics_cog.model.loading import quantization_config
from idefics_cog.serving.engine import Engine
from tests.support.helpers import negated_adapter
from tests.support.quantized import answer, changed, forced_logits, quantized_bytes


@pytest.fixture(autouse=True)
def quiet_bitsandbytes():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*cast.*float16.*")  # bitsandbytes on CPU warns at every matmul
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)  # the same, as a log line
        yield


def repacked(model) -> bool:
    return any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
               for m in model.modules() if type(m).__name__ == "Linear4bit")


def cpu_flag(flag: str) -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and f" {flag}" in cpuinfo.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_base_takes_adapters_and_its_answers_never_drift(tiny_dir, tmp_path, quantization):
    # The server's order: the default adapter at setup, before any forward.
    engine = Engine.load(tiny_dir / "base", "cpu", quantization)
    assert engine.dtype == torch.float32
    assert any("bit" in type(m).__name__ for m in engine.model.modules()), "no bitsandbytes layers"
    adapters = Adapters(engine, tmp_path)
    adapters.load_default(str(tiny_dir / "adapter"))

    # "none" is exactly a plain quantized model loaded on its own (same tokens, same logits bit for bit).
    plain = Engine.load(tiny_dir / "base", "cpu", quantization)
    base_text, base_ids = answer(plain)
    assert adapters.select("none") == "none"
    assert answer(engine) == (base_text, base_ids) and base_text
    base_logits = forced_logits(plain, base_ids)
    assert torch.equal(forced_logits(engine, base_ids), base_logits)

    # "medical" is exactly the adapter loaded with plain PEFT on its own, and differs from "none".
    model = IdeficsForVisionText2Text.from_pretrained(
        tiny_dir / "base", dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=quantization_config(quantization, torch.float32))
    peft = Engine(PeftModel.from_pretrained(model, tiny_dir / "adapter").eval(), plain.processor, plain.device)
    adapters.select("medical")
    medical_text, medical_ids = answer(engine)
    assert (medical_text, medical_ids) == answer(peft) and medical_ids != base_ids
    medical_logits = forced_logits(engine, base_ids)
    assert torch.equal(medical_logits, forced_logits(peft, base_ids))
    assert not torch.equal(medical_logits, base_logits)

    # A custom adapter loaded after the model has run changes no stored byte, and no answer.
    before = quantized_bytes(engine.model)
    other = negated_adapter(tiny_dir / "adapter", tmp_path / "negated")
    assert adapters.select(lora_weights=str(other), allow_local=True).startswith("custom_")
    negated_text, _ = answer(engine)
    assert negated_text != medical_text
    assert changed(before, quantized_bytes(engine.model)) == []
    adapters.select("medical")
    assert answer(engine) == (medical_text, medical_ids)
    assert torch.equal(forced_logits(engine, base_ids), medical_logits)
    adapters.select("none")
    assert answer(engine) == (base_text, base_ids)
    assert torch.equal(forced_logits(engine, base_ids), base_logits)


@pytest.mark.slow
def test_bitsandbytes_4bit_on_this_cpu(tiny_dir, tmp_path, record_property, capsys):
    """Records what bitsandbytes does with 4-bit weights on the machine the test runs on, and checks that the
    project's protection holds whichever it is: an adapter loaded after forwards leaves every byte as it was."""
    engine = Engine.load(tiny_dir / "base", "cpu", "4bit")
    loaded = quantized_bytes(engine.model)
    text, ids = answer(engine)
    after_forward = quantized_bytes(engine.model)
    packs = repacked(engine.model)
    # bitsandbytes decides with its own CPU check; /proc/cpuinfo is only reported.
    assert packs == has_avx512bf16(), "bitsandbytes repacked (or not) against its own AVX512-BF16 check"
    assert packs or changed(loaded, after_forward) == [], "a forward changed the weights without repacking them"

    logits = forced_logits(engine, ids)
    adapters = Adapters(engine, tmp_path)
    adapters.load_default(str(negated_adapter(tiny_dir / "adapter", tmp_path / "negated")))
    adapters.select("none")
    assert changed(after_forward, quantized_bytes(engine.model)) == [], "loading an adapter changed the base"
    assert torch.equal(forced_logits(engine, ids), logits) and answer(engine) == (text, ids)

    # What PEFT's load_adapter used to do: state_dict() on the whole model (bitsandbytes' behaviour, recorded).
    engine.model.state_dict()
    answer(engine)
    drifted = changed(after_forward, quantized_bytes(engine.model))
    drift = (forced_logits(engine, ids) - logits).abs().max().item()
    if not packs:
        assert drifted == [] and drift == 0, "without repacking, state_dict() must change nothing"
    found = (f"avx512_bf16 in /proc/cpuinfo: {cpu_flag('avx512_bf16')}; bitsandbytes has_avx512bf16: "
             f"{has_avx512bf16()}; 4-bit weights repacked at the first forward: {packs}; state_dict() then "
             f"changed {len(drifted)} of {len(after_forward)} 4-bit layers (largest logit change {drift:.3g})")
    record_property("bitsandbytes_4bit_cpu", found)
    with capsys.disabled():
        print(f"\n[bitsandbytes on this CPU] {found}")
