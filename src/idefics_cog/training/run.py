"""Fine-tune a new LoRA adapter (`cog train`) with transformers' `Trainer` and PEFT; the output is a PEFT adapter
packed as a .tar that predict's `lora_weights` takes."""

import logging
import math
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from idefics_cog.adapters.checks import layer_shapes, targeted_layers
from idefics_cog.errors import AdapterError, InputError
from idefics_cog.model.loading import load_model, pick_device
from idefics_cog.model.placement import Placement
from idefics_cog.model.tokenizer import load_processor
from idefics_cog.training.callbacks import trainer_callback
from idefics_cog.training.collator import Collator, causal_lm_loss
from idefics_cog.training.data import load_dataset
from idefics_cog.training.examples import IGNORE, ExampleDataset, prepare
from idefics_cog.training.packing import pack, save_adapter
from idefics_cog.weights.download import resolve

log = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "none", "4bit", "8bit")


@dataclass
class TrainConfig:
    """train.py's inputs; defaults as MedIDEFICS (r=16, alpha=32, q/k/v, 2e-4)."""

    num_train_epochs: int = 1
    max_steps: int = 0  # > 0: this many optimizer steps, whatever the number of epochs
    learning_rate: float = 2e-4
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    quantization: str = "auto"  # auto: 4bit on GPU, none on CPU
    seed: int = 42
    validation_fraction: float = 0.05
    logging_steps: int = 1
    device: str = "auto"  # auto | cuda | cpu

    @staticmethod
    def parse_modules(text: str) -> tuple[str, ...]:
        modules = tuple(m.strip() for m in text.split(",") if m.strip())
        if not modules:
            raise InputError("target_modules: give at least one module name, e.g. q_proj,k_proj,v_proj")
        return modules


class TrainingCancelled(Exception):
    """Nothing was written."""


@dataclass
class TrainResult:
    adapter_dir: Path
    tar_path: Path
    train_examples: int
    validation_examples: int
    history: list[dict] = field(default_factory=list)  # the Trainer's log entries (loss, learning_rate, eval_loss...)
    model: object = field(default=None, repr=False)  # the trained PeftModel, in eval mode
    processor: object = field(default=None, repr=False)

    @property
    def losses(self) -> list[float]:
        return [entry["loss"] for entry in self.history if "loss" in entry]

    @property
    def eval_losses(self) -> list[float]:
        return [entry["eval_loss"] for entry in self.history if "eval_loss" in entry]


def split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation), seeded; at least one held out when fraction > 0, unless none would be left to train."""
    if fraction <= 0:
        return list(items), []
    count = max(1, round(len(items) * fraction))
    if len(items) - count < 1:
        log.info("validation: no split, %d example(s) are too few to hold out %.0f%% and still train on one",
                 len(items), 100 * fraction)
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def resolve_quantization(quantization: str, device: torch.device) -> str:
    if quantization not in QUANTIZATIONS:
        raise InputError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == "auto":
        return "4bit" if device.type == "cuda" else "none"
    return quantization


def _one_gpu_per_process(device: torch.device) -> Placement | None:
    """Under accelerate/torchrun each process holds the whole model on its own GPU; else None (placement.py)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and local_rank is not None:
        return Placement({"": int(local_rank)}, None, f"on GPU {local_rank} (LOCAL_RANK, one process per GPU)")
    return None


def add_lora(model, config: TrainConfig, quantization: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantization in ("4bit", "8bit"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    try:  # what the server could not serve is refused now, not after the training
        targeted_layers(config.target_modules, layer_shapes(model))
    except AdapterError as exc:
        raise InputError(str(exc)) from None
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      bias="none", target_modules=list(config.target_modules))
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # PEFT: target modules not found in the base model
        raise InputError(f"target_modules: {exc}") from None



def train_adapter(archive: Path, base_source: str, cache_dir: Path, config: TrainConfig,
                  out_dir: Path | None = None, stop: threading.Event | None = None) -> TrainResult:
    """Write the adapter and its .tar under `out_dir`. Setting `stop` ends the training after the current step
    with `TrainingCancelled`, writing nothing."""
    from transformers import AutoConfig, PrinterCallback, ProgressCallback, Trainer, TrainingArguments, set_seed


    started = time.perf_counter()
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="training-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = load_dataset(Path(archive), out_dir / "dataset")
    log.info("dataset: %d examples", len(examples))  # not the archive's name: Cog's temporary file (tmp…file.zip)

    device = pick_device(config.device)
    quantization = resolve_quantization(config.quantization, device)
    path = resolve(base_source, cache_dir)
    log.info("base weights %s resolved to %s", base_source, path)
    processor = load_processor(path)
    context_tokens = AutoConfig.from_pretrained(path).max_position_embeddings
    prepared = [prepare(example, processor, context_tokens) for example in examples]
    train_items, eval_items = split(prepared, config.validation_fraction, config.seed)
    labelled = sum(int((p.labels != IGNORE).sum()) for p in train_items)
    log.info("training on %d examples (%d answer tokens), validating on %d", len(train_items), labelled,
             len(eval_items))

    set_seed(config.seed)
    model = load_model(path, device, quantization, placement=_one_gpu_per_process(device))
    model = add_lora(model, config, quantization)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("model on %s (quantization %s); LoRA r=%d alpha=%d dropout %g on %s: %d trainable parameters of %d",
             device, quantization, config.lora_rank, config.lora_alpha, config.lora_dropout,
             ",".join(config.target_modules), trainable, total)

    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    samples_per_step = config.batch_size * config.gradient_accumulation_steps * world
    callback = trainer_callback()(samples_per_step, stop)
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        logging_steps=config.logging_steps,
        eval_strategy="epoch" if eval_items else "no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        label_names=["labels"],
        remove_unused_columns=False,
        seed=config.seed,
        data_seed=config.seed,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        dataloader_pin_memory=device.type == "cuda",
    )
    trainer = Trainer(
        model=model, args=args, data_collator=Collator(processor.tokenizer.pad_token_id),
        train_dataset=ExampleDataset(train_items, processor),
        eval_dataset=ExampleDataset(eval_items, processor) if eval_items else None,
        compute_loss_func=causal_lm_loss, callbacks=[callback],
    )
    for noisy in (PrinterCallback, ProgressCallback):  # our callback prints the lines that matter
        trainer.remove_callback(noisy)
    steps = config.max_steps if config.max_steps > 0 else config.num_train_epochs * math.ceil(
        math.ceil(len(train_items) / (config.batch_size * world)) / config.gradient_accumulation_steps)
    log.info("training: %d optimizer steps, %d samples per step, learning rate %g", steps, samples_per_step,
             config.learning_rate)
    trainer.train()
    if stop is not None and stop.is_set():
        raise TrainingCancelled(f"training cancelled after step {trainer.state.global_step}")
    if eval_items and not any(e.get("step") == trainer.state.global_step and "eval_loss" in e
                              for e in callback.history):
        trainer.evaluate()  # max_steps ended mid-epoch: the validation loss of the final adapter

    adapter_dir = out_dir / "adapter"
    tar_path = out_dir / "lora.tar"
    if trainer.is_world_process_zero():
        save_adapter(model, adapter_dir, base_source)
        pack(adapter_dir, tar_path)
        log.info("adapter saved: %s (%d bytes) in %.1f s in all", tar_path.name, tar_path.stat().st_size,
                 time.perf_counter() - started)
    model.eval()
    return TrainResult(adapter_dir, tar_path, len(train_items), len(eval_items), callback.history, model, processor)


