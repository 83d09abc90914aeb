"""Settings read once from the environment; every knob is documented in README.md."""

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE_WEIGHTS = "HuggingFaceM4/idefics-9b-instruct"


@dataclass(frozen=True)
class Settings:
    base_weights: str  # a local directory or a Hugging Face repo id (optionally `@revision`)
    cache_dir: Path  # where downloaded weights are kept (`weights/`, which `cog predict` mounts)
    max_images: int  # images per request
    device: str  # "auto" (cuda when available, else cpu), "cuda" or "cpu"

    @classmethod
    def from_env(cls, env=os.environ) -> "Settings":
        return cls(
            base_weights=env.get("IDEFICS_BASE_WEIGHTS", DEFAULT_BASE_WEIGHTS),
            cache_dir=Path(env.get("IDEFICS_CACHE_DIR", ROOT / "weights")),
            max_images=_positive_int(env, "IDEFICS_MAX_IMAGES", 8),
            device=env.get("IDEFICS_DEVICE", "auto"),
        )


def _positive_int(env, name: str, default: int) -> int:
    raw = env.get(name, str(default))
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return int(raw)
