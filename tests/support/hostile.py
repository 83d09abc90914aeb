"""Hostile inputs for the tests: adapters whose config or matrices ask for more than plain LoRA, generated from the
tiny adapter, and the worker's memory as the operating system sees it."""

import dataclasses
import hashlib
import itertools

import psutil
import torch

from idefics_cog.adapters.checks import DEFAULTS


def other_value(value):
    """A JSON value that is not `value` (a PEFT default), of a kind PEFT would act on."""
    if value is None:
        return {}
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dict):
        return {key: other_value(inner) for key, inner in value.items()} or {"x": 1}
    if dataclasses.is_dataclass(value):
        return other_value(dataclasses.asdict(value))
    return [1]


def settings_beyond_plain_lora() -> dict[str, object]:
    """Every LoraConfig field the server accepts only at its default, each at another value; the settings that
    rewrote the shared weights or broke requests in PEFT 0.21 with the values that did it; and an unknown key."""
    found = {key: other_value(value) for key, value in DEFAULTS.items()}
    found.update(kasa_config={}, arrow_config={}, velora_config={}, monteclora_config={}, use_bdlora=True,
                 alora_invocation_tokens=[1, 2], surprise=1)
    return found


def with_layer(name: str, in_features: int, out_features: int, rank: int = 16):
    """A change of the tensors: LoRA matrices added for the layer `name`."""
    def add(tensors: dict) -> dict:
        prefix = f"base_model.model.{name}"
        return {**tensors, f"{prefix}.lora_A.weight": torch.zeros(rank, in_features),
                f"{prefix}.lora_B.weight": torch.zeros(out_features, rank)}
    return add


def not_finite(tensors: dict) -> dict:
    key = sorted(tensors)[0]
    return {**tensors, key: torch.full_like(tensors[key], float("nan"))}


def worker_rss(server) -> int:
    """Resident bytes of the Cog server's worker processes."""
    return sum(p.memory_info().rss for p in psutil.Process(server.process.pid).children(recursive=True))


def shared_digest(model) -> str:
    """sha256 over the base model's tensors by name (PEFT's `.base_layer` in a wrapped layer's names dropped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    digest = hashlib.sha256()
    tensors = itertools.chain(base.named_parameters(), base.named_buffers())
    named = {name.replace(".base_layer", ""): tensor for name, tensor in tensors if "lora_" not in name}
    for name in sorted(named):
        digest.update(name.encode())
        digest.update(named[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
