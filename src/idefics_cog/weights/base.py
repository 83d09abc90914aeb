"""What every weight source shares: the errors, the hub id pattern, the pickle rules, the environment flags.
The bottom of the weights part: it imports nothing of ours, so hub.py, archive.py and resolve.py all import it."""

import os
import re

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
# Pickled weights can run code when loaded: never fetched from the hub, never loaded, with one exception: an
# adapter's adapter_model.bin, read by torch's weights-only unpickler and converted to safetensors (adapters.py).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ADAPTER_PICKLE = "adapter_model.bin"  # PEFT's older adapter format, at an adapter's root


class WeightsError(RuntimeError):
    """A weight source that cannot be used; the message names the source."""


class UnreachableError(WeightsError):
    """Weights in no cache, from a hub that cannot be used now (offline, unreachable): another source would do."""


def env_flag(name: str) -> bool:
    """A boolean environment variable (HF_HUB_OFFLINE and the like), read at call time, as huggingface_hub reads it."""
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))
