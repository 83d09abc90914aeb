"""What every weight source shares: the errors, the hub id pattern, the pickle rules, the environment flags.
The bottom of the weights part (its errors come from errors.py, shared with the other parts): hub.py, archive.py
and resolve.py all import it, and it imports none of them."""

import os
import re

from idefics_cog.errors import UnreachableError, WeightsError

__all__ = ["ADAPTER_PICKLE", "HUB_ID", "PICKLE_SUFFIXES", "UnreachableError", "WeightsError", "env_flag",
           "is_url"]

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
# Pickled weights can run code when loaded: never fetched from the hub, never loaded, with one exception: an
# adapter's adapter_model.bin, read by torch's weights-only unpickler and converted to safetensors (adapters.py).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ADAPTER_PICKLE = "adapter_model.bin"  # PEFT's older adapter format, at an adapter's root


def env_flag(name: str) -> bool:
    """A boolean environment variable (HF_HUB_OFFLINE and the like), read at call time, as huggingface_hub reads it."""
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))
