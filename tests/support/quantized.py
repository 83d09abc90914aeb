"""What a quantized model did: its greedy answer with token ids, teacher-forced logits, and its bitsandbytes
layers' stored bytes (to see which changed). Used by tests/model/test_loading.py and bench/gpu_facts.py."""

import torch

from idefics_cog.inputs.prompt import build_segments
from tests.support.engine import CASES, run

TEXT, IMAGES = CASES["one image"]


def answer(engine) -> tuple[str, list[int]]:
    """The greedy answer and its token ids."""
    text = run(engine, TEXT, IMAGES, max_new_tokens=16)
    return text, list(engine.last_stats.ids)


def forced_logits(engine, continuation: list[int]) -> torch.Tensor:
    """Teacher-forced logits: one forward over the prompt followed by `continuation` (fixed tokens, so they do not
    depend on what this model would pick), at every position."""
    encoded = engine.encode(build_segments(TEXT, len(IMAGES)), list(IMAGES))
    extra = torch.tensor([continuation], device=engine.device)
    inputs = encoded.to(engine.device, engine.dtype)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    last = inputs["image_attention_mask"][:, -1:]  # the new tokens see the images the prompt's last token sees
    inputs["image_attention_mask"] = torch.cat([inputs["image_attention_mask"]] + [last] * len(continuation), dim=1)

    def forward() -> torch.Tensor:
        with torch.inference_mode():  # as the scheduler runs it (bitsandbytes repacks only without autograd)
            return engine.model(**inputs).logits[0].float()

    return engine.torch_thread.submit(forward).result()


def quantized_bytes(model) -> dict[str, list[torch.Tensor]]:
    """Every bitsandbytes layer's stored weight and quantization state (4-bit: absmax, nested state), copied."""
    found = {}
    for name, module in model.named_modules():
        if "bit" not in type(module).__name__:
            continue
        weight = module.weight
        tensors = [weight.data]
        state = getattr(weight, "quant_state", None)
        if state is not None:
            tensors += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
            nested = getattr(state, "state2", None)
            tensors += [v for v in vars(nested).values() if isinstance(v, torch.Tensor)] if nested else []
        if getattr(weight, "SCB", None) is not None:
            tensors.append(weight.SCB)
        plain = name.removeprefix("base_model.model.").removesuffix(".base_layer")  # the name before PEFT wrapped it
        found[plain] = [t.detach().clone() for t in tensors]
    return found


def changed(before: dict, after: dict) -> list[str]:
    assert before.keys() == after.keys()
    return [name for name in before if len(before[name]) != len(after[name]) or not all(
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(before[name], after[name]))]
