"""Loading the IDEFICS model for serving and training: bf16 on GPU, float32 on CPU, optionally 8-bit or 4-bit."""

from pathlib import Path

import torch
from transformers import BitsAndBytesConfig, IdeficsForVisionText2Text

from idefics_cog.model.memory import ACTIVATIONS, DEFAULT_FRACTION
from idefics_cog.model.placement import Placement, place
from idefics_cog.quiet import no_loading_bars


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def quantization_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """MedIDEFICS's settings: nf4 with double quantization; the output and embedding layers stay unquantized."""
    keep = ["lm_head", "embed_tokens"]
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=keep)
    return None


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(path: Path, device: torch.device, quantization: str, working: int = ACTIVATIONS,
               placement: Placement | None = None, fraction: float = DEFAULT_FRACTION):
    """`working`: bytes needed beside the weights; `placement` overrides placement.py's decision."""
    dtype = compute_dtype(device)
    placement = placement or place(path, device, quantization, working, fraction)
    no_loading_bars()
    return IdeficsForVisionText2Text.from_pretrained(
        path, dtype=dtype, quantization_config=quantization_config(quantization, dtype),
        device_map=placement.device_map, max_memory=placement.max_memory)
