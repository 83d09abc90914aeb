"""The trained adapter on disk: the standard PEFT layout, and the .tar that predict's `lora_weights` takes."""

import json
import tarfile
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def save_adapter(model, folder: Path, base_source: str) -> None:
    model.save_pretrained(str(folder), safe_serialization=True)
    config_path = folder / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_source  # not the local cache path PEFT recorded
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def pack(folder: Path, tar_path: Path) -> Path:
    """The adapter files at the root of an uncompressed tar (what `lora_weights` and plain PEFT take)."""
    with tarfile.open(tar_path, "w") as tar:
        for name in ADAPTER_FILES:
            tar.add(folder / name, arcname=name)
    return tar_path
