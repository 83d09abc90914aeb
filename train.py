"""`cog train` for IDEFICS: a new LoRA adapter (a PEFT .tar that predict's `lora_weights` takes) from a dataset.
Every `Input(...)` argument is a literal: `cog build` reads this file statically."""

import asyncio
import sys
import threading
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parent / "src"))

import cog  # noqa: E402
from cog import Input, Path  # noqa: E402


_ONE_TRAINING_AT_A_TIME = threading.Lock()  # two at once would need twice the GPU memory


class TrainingOutput(cog.BaseModel):
    weights: Path


async def train(
    dataset: Path = Input(
        description="A .zip or .tar holding data.jsonl and its images. Each line: {\"images\": [\"img/1.png\"], "
        "\"question\": \"...\", \"answer\": \"...\"} or {\"images\": [...], \"conversation\": [{\"user\": \"...\", "
        "\"assistant\": \"...\"}, ...]}, image paths relative to the archive root.",
    ),
    num_train_epochs: int = Input(description="Passes over the training examples.", ge=1, le=100, default=1),
    max_steps: int = Input(
        description="Optimizer steps to run; when above 0 it overrides num_train_epochs.", ge=0, le=1000000,
        default=0,
    ),
    learning_rate: float = Input(description="Peak learning rate (linear decay).", ge=1e-7, le=1.0, default=2e-4),
    lora_rank: int = Input(description="LoRA rank r (at most 64: what a server serves by default, "
                           "IDEFICS_MAX_ADAPTER_RANK).", ge=1, le=64, default=16),
    lora_alpha: int = Input(description="LoRA alpha (the update is scaled by alpha / r).", ge=1, le=1024,
                            default=32),
    lora_dropout: float = Input(description="Dropout on the LoRA input.", ge=0.0, le=0.9, default=0.05),
    target_modules: str = Input(
        description="Comma-separated names of the Linear layers that get LoRA (q_proj,k_proj,v_proj covers the "
        "text, cross-attention, perceiver and vision attention, as MedIDEFICS).",
        default="q_proj,k_proj,v_proj",
    ),
    batch_size: int = Input(description="Examples per device per forward pass.", ge=1, le=128, default=1),
    gradient_accumulation_steps: int = Input(
        description="Forward passes per optimizer step (the effective batch is batch_size times this).", ge=1,
        le=1024, default=1,
    ),
    quantization: str = Input(
        description="Precision of the frozen base model: auto (4bit on GPU, none on CPU), none (bf16 on GPU, "
        "float32 on CPU), 4bit (nf4, as MedIDEFICS) or 8bit.",
        choices=["auto", "none", "4bit", "8bit"],
        default="auto",
    ),
    seed: int = Input(description="Random seed (LoRA init, shuffling, dropout, validation split).", ge=0,
                      le=4294967295, default=42),
    validation_fraction: float = Input(
        description="Share of the examples held out for the validation loss (0: none; none either when too few "
        "examples remain to train on).", ge=0.0, le=0.5, default=0.05,
    ),
) -> TrainingOutput:
    """`async`: coglet 0.23.1 refuses a synchronous handler when COG_MAX_CONCURRENCY (set for predictions) is
    above 1. The training runs on a worker thread; cancelling stops it after the current step."""
    import logging
    import tempfile

    from idefics_cog.config import Settings
    from idefics_cog.training.run import TrainConfig, train_adapter

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings.from_env()
    config = TrainConfig(
        num_train_epochs=num_train_epochs, max_steps=max_steps, learning_rate=learning_rate, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=TrainConfig.parse_modules(target_modules),
        batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps, quantization=quantization,
        seed=seed, validation_fraction=validation_fraction, device=settings.device,
    )

    stop = threading.Event()

    def run():
        with _ONE_TRAINING_AT_A_TIME:
            return train_adapter(_Path(dataset), settings.base_weights, settings.cache_dir, config,
                                 _Path(tempfile.mkdtemp(prefix="training-")), stop)

    try:
        result = await asyncio.to_thread(run)
    except asyncio.CancelledError:  # a cancelled training stops after its current step
        stop.set()
        raise
    return TrainingOutput(weights=Path(result.tar_path))
