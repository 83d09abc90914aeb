"""Training throughput of `cog train` (LoRA r=16 on q/k/v, transformers Trainer, the project's collator and loss).

Default: the embedded tiny IDEFICS on CPU, on a synthetic dataset built like the tests' (noise images, one or
two per example, short answers, some two-turn conversations), encoded by the same code as train.py
(`training.prepare`, `ExampleDataset`, `Collator`, `causal_lm_loss`). For each batch size, `--repeats` runs of
`--steps` optimizer steps after `--warmup` steps; each run gives the median ms per step (every step timed, the
warm-up left out). The table gives, across runs, the median and minimum of those, and each against batch 1;
samples/s = batch size / (median ms per step).

    make tiny
    .venv/bin/python bench/training.py [--repeats 3] [--steps 20] [--batch-sizes 1,2,4]

`--real-size` builds a random IDEFICS with the idefics-9b configuration (hidden 4096, 32 layers, 32 heads,
intermediate 11008, vocab 32000 + 2, cross-attention every 4 layers; CLIP ViT-H/14 at 224 px, 32 layers;
perceiver 6 x 16 heads x 96, 64 latents) in bf16 on CUDA, with synthetic batches (one 224 px image, --tokens
tokens, the last 32 labelled), and measures the same thing on the GPU. It needs a GPU with about 40 GB
(bf16 weights ~18 GB plus activations); it was NOT run on the 2-core CPU machine where this file was written,
and is meant to run as is:

    python bench/training.py --real-size [--batch-sizes 1,4,8] [--tokens 256]

`--real-size --smoke` runs that same code path on CPU with a scaled-down configuration (a check that it works).
"""

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from bench.stats import median_table  # noqa: E402
from tests.support.helpers import dataset_zip, vqa_lines  # noqa: E402
from idefics_dev.tiny import idefics_9b_config, random_model  # noqa: E402
from idefics_cog.training.collator import Collator, causal_lm_loss  # noqa: E402
from idefics_cog.training.examples import IGNORE  # noqa: E402
from idefics_cog.training.run import TrainConfig, add_lora  # noqa: E402

BASE = ROOT / "weights" / "tiny" / "base"
_WORK = tempfile.TemporaryDirectory(prefix="bench-training-")  # removed when the benchmark exits
WORK = Path(_WORK.name)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (CUDA synchronized at both ends)."""

    def __init__(self):
        self.times: list[float] = []
        self.started = 0.0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self.started)


def run_steps(model, dataset, pad_id: int, batch_size: int, steps: int, warmup: int, cuda: bool) -> float:
    """Median ms per optimizer step over `steps` steps after `warmup` steps."""
    timer = StepTimer()
    args = TrainingArguments(
        output_dir=str(WORK / "trainer"), max_steps=warmup + steps, learning_rate=1e-4,
        per_device_train_batch_size=batch_size, optim="adamw_torch", logging_steps=10**6, save_strategy="no",
        report_to="none", disable_tqdm=True, label_names=["labels"], remove_unused_columns=False, seed=0,
        bf16=cuda, use_cpu=not cuda, dataloader_pin_memory=cuda,
    )
    trainer = Trainer(model=model, args=args, data_collator=Collator(pad_id), train_dataset=dataset,
                      compute_loss_func=causal_lm_loss, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return 1000 * statistics.median(timer.times[warmup:])


# --- the tiny model on the project's data pipeline ----------------------------------------------------------------


def tiny_dataset(folder: Path, count: int = 16) -> Path:
    return dataset_zip(folder / "data.zip", *vqa_lines(count))


def tiny_setup():
    from transformers import IdeficsForVisionText2Text

    from idefics_cog.training.data import load_dataset
    from idefics_cog.model.tokenizer import load_processor
    from idefics_cog.training.examples import ExampleDataset, prepare

    folder = Path(tempfile.mkdtemp(dir=WORK))
    processor = load_processor(BASE)
    examples = load_dataset(tiny_dataset(folder), folder / "data")
    dataset = ExampleDataset([prepare(e, processor, 512) for e in examples], processor)

    def model():
        torch.manual_seed(0)
        base = IdeficsForVisionText2Text.from_pretrained(BASE, dtype=torch.float32, device_map={"": "cpu"})
        return add_lora(base, TrainConfig(), "none")

    return model, dataset, processor.tokenizer.pad_token_id, False


# --- a random idefics-9b on CUDA ------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """`<s>` + one image (<fake><image><fake>) + random text: `tokens` tokens, the last 32 labelled."""

    FAKE, IMAGE = 32000, 32001

    def __init__(self, tokens: int, image_size: int, count: int = 64):
        self.tokens, self.image_size, self.count = tokens, image_size, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        ids = torch.randint(3, 32000, (self.tokens,), generator=generator)
        ids[0], ids[1:4] = 1, torch.tensor([self.FAKE, self.IMAGE, self.FAKE])
        labels = torch.full_like(ids, IGNORE)
        labels[-32:] = ids[-32:]
        mask = torch.zeros(self.tokens, 1, dtype=torch.long)
        mask[2:] = 1  # every token from the image on attends to it
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                "pixel_values": torch.randn(1, 3, self.image_size, self.image_size, generator=generator),
                "image_attention_mask": mask}


def real_setup(tokens: int, smoke: bool):
    cuda = not smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--real-size needs a CUDA GPU (or add --smoke for a scaled-down run on CPU)")
    config = idefics_9b_config(smoke)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)

    def model():
        return add_lora(random_model(config, device, dtype), TrainConfig(), "none")

    return model, SyntheticDataset(tokens, config.vision_config.image_size), 0, cuda


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,2,4")
    parser.add_argument("--real-size", action="store_true", help="a random idefics-9b in bf16 on CUDA")
    parser.add_argument("--smoke", action="store_true", help="with --real-size: scaled down, on CPU")
    parser.add_argument("--tokens", type=int, default=256, help="--real-size: tokens per example")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    make_model, dataset, pad_id, cuda = real_setup(args.tokens, args.smoke) if args.real_size else tiny_setup()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    model = make_model()  # LoRA weights keep training from run to run: only the speed is measured
    ms: dict[str, list[float]] = {f"batch {b}": [] for b in sizes}
    for _ in range(args.repeats):
        for size in sizes:  # round-robin, so a slow moment of the machine hits every batch size
            ms[f"batch {size}"].append(run_steps(model, dataset, pad_id, size, args.steps, args.warmup, cuda))
    where = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, " \
        f"{torch.get_num_threads()} threads"
    what = "random idefics-9b (bf16)" if args.real_size and not args.smoke else \
        "scaled-down idefics-9b shape (smoke)" if args.real_size else "tiny IDEFICS (float32)"
    print(f"LoRA r=16 q/k/v training steps, {what} on {where}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {args.repeats} runs x {args.steps} steps (+{args.warmup} "
          f"warm-up)\n")
    print(median_table("ms per optimizer step", ms, f"batch {sizes[0]}"))
    print("\n| batch | samples/s (median) |\n|---|---:|")
    for size in sizes:
        print(f"| {size} | {size * 1000 / statistics.median(ms[f'batch {size}']):.1f} |")


if __name__ == "__main__":
    main()
