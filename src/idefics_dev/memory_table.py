"""README's GPU memory table, computed with the serving rule itself for idefics-9b and -80b (a GPU of "N GB" has
N x 10^9 bytes; default settings). `python -m idefics_dev.memory_table` prints it; a test checks README has it."""

from accelerate import init_empty_weights
from transformers import IdeficsForVisionText2Text

from idefics_cog.model.memory import DEFAULT_FRACTION, GiB, kv_cache_budget, plan_kv_cache
from idefics_cog.model.placement import parameter_counts, weight_bytes
from idefics_dev.tiny import idefics_9b_config

GPUS_GB = (16, 24, 40, 80)
PRECISIONS = {"bf16": "none", "8-bit": "8bit", "4-bit": "4bit"}
CUDA_RESERVED = GiB // 2  # CUDA's context and torch's own buffers, before the weights
MAX_BATCH, MAX_IMAGES = 16, 8


def idefics_config(size: str):
    """idefics-9b, or idefics-80b (the same vision tower and perceiver on Llama-65b; models-and-anchors.md)."""
    config = idefics_9b_config()
    if size == "80b":
        config.hidden_size, config.intermediate_size = 8192, 22016
        config.num_hidden_layers, config.num_attention_heads = 80, 64
    return config


def parameters(config) -> tuple[int, int]:
    """(quantizable, other) parameters, counted on the model built on the meta device (no memory)."""
    with init_empty_weights():
        model = IdeficsForVisionText2Text(config)
    return parameter_counts({key: tuple(t.shape) for key, t in model.state_dict().items()})


def cell(config, weights: int, gb: int) -> str:
    """What the fast path gets on one GPU of `gb` GB: slots x context, or why it does not fit."""
    total = gb * 10**9
    budget = kv_cache_budget(total - CUDA_RESERVED - weights, total, DEFAULT_FRACTION)
    try:
        plan = plan_kv_cache(config, MAX_BATCH, MAX_IMAGES, 2, budget)
    except ValueError:
        return "no"
    return f"{plan.slots} x {plan.context_tokens}"


def table() -> str:
    header = ["checkpoint", "precision", "weights"] + [f"{gb} GB GPU" for gb in GPUS_GB]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in ("9b", "80b"):
        config = idefics_config(size)
        counts = parameters(config)
        for name, quantization in PRECISIONS.items():
            weights = weight_bytes(*counts, quantization)
            cells = [cell(config, weights, gb) for gb in GPUS_GB]
            lines.append(f"| idefics-{size} | {name} | {weights / 10**9:.1f} GB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
