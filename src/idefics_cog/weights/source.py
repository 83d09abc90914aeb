"""What a weight source is: a local folder, a hub id `owner/name[@revision]` or an http(s) URL; which files are pickles
(never loaded, but for an adapter's adapter_model.bin); environment flags, read at each call."""

import os
import re

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # loading a pickle can run code
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a PEFT LoRA adapter's files
ADAPTER_PICKLE = "adapter_model.bin"  # PEFT's older adapter format: read by torch's weights-only unpickler only


def env_flag(name: str) -> bool:
    """A boolean environment variable, with the values huggingface_hub accepts."""
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))


def offline() -> bool:
    return env_flag("HF_HUB_OFFLINE")
