"""Where the model goes: on one GPU whenever it fits there, spread over several only when not. transformers'
`device_map="auto"` would spread even a model that fits one GPU, and a spread model cannot use the fast path."""

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from idefics_cog.model.memory import ACTIVATIONS, DEFAULT_FRACTION, GiB, usable_memory

log = logging.getLogger(__name__)

# Bytes per quantized parameter: int8; or nf4 plus an 8-bit absmax per block of 64 and its second-level state.
QUANTIZED_BYTES = {"none": None, "8bit": 1.0, "4bit": 0.5 + 1 / 64 + 0.002}


@dataclass(frozen=True)
class Placement:
    device_map: dict | str
    max_memory: dict | None
    reason: str

    @property
    def spread(self) -> bool:
        return self.device_map == "auto"


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """From the safetensors headers: no weight is read."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors files to size the model from")
    shapes = {}
    for file in files:
        with safe_open(file, "pt") as tensors:
            shapes.update({key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()})
    return shapes


def parameter_counts(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(parameters bitsandbytes quantizes: 2-D weights but the embeddings and lm_head, all other parameters)."""
    quantizable = other = 0
    for key, shape in shapes.items():
        count = math.prod(shape)
        linear = len(shape) == 2 and key.endswith(".weight") and "embed" not in key and "lm_head" not in key
        quantizable += count if linear else 0
        other += 0 if linear else count
    return quantizable, other


def weight_bytes(quantizable: int, other: int, quantization: str, dtype_bytes: int = 2) -> int:
    per_parameter = QUANTIZED_BYTES[quantization] or dtype_bytes
    return int(quantizable * per_parameter + other * dtype_bytes)


def decide(weights: int, working: int, free: dict[int, int], cpu: int = 0) -> Placement:
    """`working`: bytes needed beside the weights (KV cache, activations); `free`: GPU index -> usable bytes; `cpu`:
    CPU memory for what the GPUs cannot hold (without it accelerate would send the rest to disk)."""
    if not free:
        return Placement({"": "cpu"}, None, "no GPU: on the CPU")
    best = max(free, key=lambda index: free[index])
    need = weights + working
    if need <= free[best] or len(free) == 1:
        fits = "" if need <= free[best] else (
            "; that is more than it has: quantize (IDEFICS_QUANTIZATION), raise IDEFICS_CACHE_MEMORY_FRACTION "
            "or use a larger GPU")
        return Placement({"": best}, None, f"on GPU {best} ({free[best] / GiB:.1f} GiB usable) alone: "
                         f"{weights / GiB:.1f} GiB of weights + {working / GiB:.1f} GiB of caches and "
                         f"activations{fits}")
    # Each GPU keeps room for activations and model.generate's growing KV cache.
    max_memory = {index: max(0, room - ACTIVATIONS) for index, room in free.items()}
    over = "" if weights <= sum(max_memory.values()) else (
        "; even all GPUs together are too small, the rest goes to CPU memory (very slow)")
    max_memory["cpu"] = cpu
    return Placement("auto", max_memory, f"spread over {len(free)} GPUs: {weights / GiB:.1f} GiB of weights + "
                     f"{working / GiB:.1f} GiB of caches and activations do not fit the largest free GPU "
                     f"({free[best] / GiB:.1f} GiB). Cost: the fast path is off (model.generate, one request "
                     f"at a time, no batching; slower){over}")


def free_memory(fraction: float = DEFAULT_FRACTION) -> tuple[dict[int, int], int]:
    """Usable bytes of each visible GPU (empty without CUDA), and the CPU's available memory."""
    import torch
    from accelerate.utils import get_max_memory

    if not torch.cuda.is_available():
        return {}, 0
    gpus = {index: max(0, usable_memory(*torch.cuda.mem_get_info(index), fraction))
            for index in range(torch.cuda.device_count())}
    return gpus, get_max_memory().get("cpu", 0)


def place(path: Path, device, quantization: str, working: int, fraction: float = DEFAULT_FRACTION) -> Placement:
    """An explicit GPU (`cuda:1`) is taken as given; `cuda` chooses among all GPUs."""
    if device.type != "cuda":
        placement = Placement({"": str(device)}, None, f"on {device}")
    elif device.index is not None:
        placement = Placement({"": device.index}, None, f"on GPU {device.index}, as IDEFICS_DEVICE asks")
    else:
        free, cpu = free_memory(fraction)
        if not free:
            raise ValueError("IDEFICS_DEVICE=cuda, but no GPU is visible (use auto or cpu)")
        placement = decide(weight_bytes(*parameter_counts(checkpoint_shapes(path)), quantization), working, free, cpu)
    (log.warning if placement.spread else log.info)("placement: %s", placement.reason)
    return placement
