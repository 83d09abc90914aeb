"""A configuration to evaluate: which adapter answers, as a request names it (adapter, lora_weights, lora_scale)."""

from dataclasses import dataclass
from pathlib import Path

from idefics_cog.weights.source import HUB_ID, is_url

ADAPTERS = ("medical", "none")  # as adapters.MEDICAL and adapters.NONE


@dataclass(frozen=True)
class Configuration:
    """What `Adapters.select` gets, or a request's inputs; `lora_weights` wins over `adapter`."""

    adapter: str = "medical"
    lora_weights: str = ""
    lora_scale: float = 1.0

    @property
    def label(self) -> str:
        name = _short(self.lora_weights) if self.lora_weights else self.adapter
        return name if self.lora_scale == 1 else f"{name} x{self.lora_scale:g}"


def _short(source: str) -> str:
    """`.../trained.tar#sha256=...` -> `trained.tar`; a hub id stays whole."""
    if HUB_ID.match(source) and not Path(source).exists():
        return source
    return source.split("#")[0].split("?")[0].rstrip("/").rsplit("/", 1)[-1] if is_url(source) else Path(source).name
