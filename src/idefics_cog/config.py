"""Settings read once from the environment (documented in docs/configuration.md, set in cog.yaml)."""

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE_WEIGHTS = "HuggingFaceM4/idefics-9b-instruct"
DEFAULT_ADAPTER_WEIGHTS = "WinterSchool/Midefics-lora-v3"
QUANTIZATIONS = ("none", "8bit", "4bit")
DECODE_PATHS = ("auto", "fast", "transformers")
COMPILE = ("auto", "on", "off")
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 50_000_000
MAX_ASPECT_RATIO = 20.0  # long side / short side
MAX_ADAPTER_RANK = 64  # MedIDEFICS: 16
ADAPTER_BANK_RANK = 128  # the ranks of the adapters decoding at once, added up


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = MAX_IMAGE_PIXELS
    max_bytes: int = MAX_IMAGE_BYTES
    max_aspect_ratio: float = MAX_ASPECT_RATIO

    @classmethod
    def from_env(cls, env=None) -> "ImageLimits":
        env = os.environ if env is None else env
        return cls(_positive(env, "IDEFICS_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS, int),
                   _positive(env, "IDEFICS_MAX_IMAGE_BYTES", MAX_IMAGE_BYTES, int),
                   _positive(env, "IDEFICS_MAX_ASPECT_RATIO", MAX_ASPECT_RATIO, float))


@dataclass(frozen=True)
class RequestLimits:
    """Checked before any work is done for a request."""

    prompt_chars: int = 100_000  # prompt + system_prompt (2048 tokens are ~10,000 characters)
    stop_sequences: int = 16
    stop_sequence_chars: int = 256
    choices: int = 32  # candidates of one `choices` request, scored in one forward
    choice_chars: int = 256
    lora_weights_chars: int = 2048  # signed URLs are long
    image_download_seconds: int = 60  # for all of a request's image URLs

    @classmethod
    def from_env(cls, env=None) -> "RequestLimits":
        env = os.environ if env is None else env
        return cls(**{field: _positive(env, variable, getattr(cls, field), int) for field, variable in (
            ("prompt_chars", "IDEFICS_MAX_PROMPT_CHARS"), ("stop_sequences", "IDEFICS_MAX_STOP_SEQUENCES"),
            ("stop_sequence_chars", "IDEFICS_MAX_STOP_SEQUENCE_CHARS"), ("choices", "IDEFICS_MAX_CHOICES"),
            ("choice_chars", "IDEFICS_MAX_CHOICE_CHARS"),
            ("lora_weights_chars", "IDEFICS_MAX_LORA_WEIGHTS_CHARS"),
            ("image_download_seconds", "IDEFICS_IMAGE_DOWNLOAD_SECONDS"))})


@dataclass(frozen=True)
class Settings:
    base_weights: str  # a local directory, an https URL of a .tar/.zip, or a hub id (`owner/name@revision`)
    adapter_weights: str  # the `medical` adapter; "" when disabled
    trained_weights: str  # COG_WEIGHTS (a version made by `cog train`), replacing adapter_weights; or ""
    quantization: str
    cache_dir: Path  # downloaded weights (IDEFICS_CACHE_DIR)
    max_images: int
    max_loaded_adapters: int  # besides `medical`
    adapter_disk_bytes: int  # downloaded custom adapters (IDEFICS_ADAPTER_CACHE_BYTES)
    max_adapter_bytes: int
    adapter_download_seconds: int
    device: str
    decode_path: str  # IDEFICS_ENGINE: fast | transformers (model.generate) | auto
    max_batch: int
    gpu_memory_fraction: float = 0.9  # IDEFICS_CACHE_MEMORY_FRACTION: weights, KV cache and activations
    warmup: bool = True
    weights_lock: Path = ROOT / "weights.lock"  # Cog's managed weights (`cog weights import`)
    image_limits: ImageLimits = ImageLimits()
    request_limits: RequestLimits = RequestLimits()
    max_adapter_rank: int = MAX_ADAPTER_RANK
    adapter_fetch_threads: int = 4
    compile: str = "auto"
    adapter_bank_rank: int = ADAPTER_BANK_RANK

    def __post_init__(self):
        if self.adapter_bank_rank < self.max_adapter_rank:
            raise ValueError(f"IDEFICS_ADAPTER_BANK_RANK ({self.adapter_bank_rank}) must be at least "
                             f"IDEFICS_MAX_ADAPTER_RANK ({self.max_adapter_rank}): an adapter of the largest rank "
                             "allowed must fit the decode step's LoRA banks")

    @classmethod
    def from_env(cls, env=os.environ, trained_weights: str | None = None) -> "Settings":
        """`trained_weights`: setup's `weights` (COG_WEIGHTS), or None."""
        adapter = env.get("IDEFICS_ADAPTER_WEIGHTS", DEFAULT_ADAPTER_WEIGHTS)
        return cls(
            base_weights=env.get("IDEFICS_BASE_WEIGHTS", DEFAULT_BASE_WEIGHTS),
            adapter_weights="" if adapter.lower() in ("", "none") else adapter,
            trained_weights=str(trained_weights or "").strip(),
            quantization=_choice(env, "IDEFICS_QUANTIZATION", QUANTIZATIONS),
            cache_dir=Path(env.get("IDEFICS_CACHE_DIR", ROOT / "weights")),
            max_images=_positive_int(env, "IDEFICS_MAX_IMAGES", 8),
            max_loaded_adapters=_positive_int(env, "IDEFICS_MAX_LOADED_ADAPTERS", 4),
            adapter_disk_bytes=_positive_int(env, "IDEFICS_ADAPTER_CACHE_BYTES", 4 << 30),
            max_adapter_bytes=_positive_int(env, "IDEFICS_MAX_ADAPTER_BYTES", 1 << 30),
            adapter_download_seconds=_positive_int(env, "IDEFICS_ADAPTER_DOWNLOAD_SECONDS", 300),
            device=env.get("IDEFICS_DEVICE", "auto"),
            decode_path=_choice(env, "IDEFICS_ENGINE", DECODE_PATHS),
            max_batch=_positive_int(env, "IDEFICS_MAX_BATCH", 16),
            gpu_memory_fraction=_fraction(env, "IDEFICS_CACHE_MEMORY_FRACTION", 0.9),
            warmup=_flag(env, "IDEFICS_WARMUP", True),
            weights_lock=Path(env.get("IDEFICS_WEIGHTS_LOCK", ROOT / "weights.lock")),
            image_limits=ImageLimits.from_env(env),
            request_limits=RequestLimits.from_env(env),
            max_adapter_rank=_positive_int(env, "IDEFICS_MAX_ADAPTER_RANK", MAX_ADAPTER_RANK),
            adapter_fetch_threads=_positive_int(env, "IDEFICS_ADAPTER_FETCH_THREADS", 4),
            compile=_choice(env, "IDEFICS_COMPILE", COMPILE),
            adapter_bank_rank=_positive_int(env, "IDEFICS_ADAPTER_BANK_RANK", ADAPTER_BANK_RANK),
        )


def _positive_int(env, name: str, default: int) -> int:
    raw = env.get(name, str(default))
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return int(raw)


def _positive(env, name: str, default, kind):
    """Unset or empty: `default`."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def _fraction(env, name: str, default: float) -> float:
    """In (0, 1]; unset or empty: `default`."""
    value = _positive(env, name, default, float)
    if value > 1:
        raise ValueError(f"{name}={value!r} must be at most 1 (a fraction of the GPU's memory)")
    return value


def _flag(env, name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in ("0", "1", "true", "false"):
        raise ValueError(f"{name} must be 0 or 1, got {raw!r}")
    return raw in ("1", "true")


def _choice(env, name: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, choices[0])
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
