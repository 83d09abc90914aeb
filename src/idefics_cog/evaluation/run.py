"""Evaluate the model on a dataset in the training format, in one or two adapter configurations side by side, each
example's last question asked through a prediction's code path with greedy decoding."""

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from idefics_cog.config import Settings
from idefics_cog.errors import InputError, WeightsError
from idefics_cog.evaluation.metrics import aggregate, score
from idefics_cog.weights.source import HUB_ID, is_url

# torch, transformers and peft are imported where used, so that `--help` is quick.

log = logging.getLogger(__name__)

ADAPTERS = ("medical", "none")  # as adapters.MEDICAL and adapters.NONE



@dataclass(frozen=True)
class Configuration:
    """What `Adapters.select` gets; `lora_weights` wins over `adapter`."""

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


def select(adapters, config: Configuration) -> str:
    """Unlike a request, the operator may name a local directory as `lora_weights`."""
    return adapters.engine.run(adapters.select, config.adapter, config.lora_weights, config.lora_scale, True)


def predict(engine, example, max_new_tokens: int) -> str:
    from idefics_cog.serving.jobs import Sampling

    segments, _ = example.transcript(answer_last=False)  # ends with "\nAssistant:"
    encoded = engine.encode(segments, example.load_images())
    return "".join(engine.stream(encoded, Sampling(max_new_tokens=max_new_tokens, seed=0))).strip()


def evaluate(engine, adapters, examples, configurations: list[Configuration], max_new_tokens: int) -> list[dict]:
    results = []
    for config in configurations:
        active = select(adapters, config)
        log.info("configuration %s: adapter in use %s", config.label, active)
        records = []
        for number, example in enumerate(examples, start=1):
            record = {"line": example.line, "question": example.turns[-1].user,
                      "reference": example.turns[-1].assistant, "prediction": ""}
            try:
                record["prediction"] = predict(engine, example, max_new_tokens)
            except InputError as exc:  # e.g. a prompt longer than the context: scored as an empty answer
                record["error"] = str(exc)
                log.warning("%s: data.jsonl line %d: %s", config.label, example.line, exc)
            record.update(score(record["prediction"], record["reference"]))
            records.append(record)
            log.info("%s: %d/%d (data.jsonl line %d)", config.label, number, len(examples), example.line)
        results.append({"label": config.label, **asdict(config), "active": active,
                        "metrics": aggregate(records), "predictions": records})
    return results


ROWS = [("closed accuracy (yes/no)", "closed_accuracy"), ("open recall", "open_recall"), ("token F1", "f1"),
        ("exact match", "exact_match"), ("BLEU-4", "bleu")]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def markdown_table(results: list[dict]) -> str:
    """Metric rows in %, one column per configuration, and the difference in points."""
    labels = [r["label"] for r in results]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({index})" for index, label in enumerate(labels, start=1)]
    compare = len(results) == 2
    header = ["metric (%)", *labels] + (["difference"] if compare else [])
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for title, key in ROWS:
        values = [r["metrics"][key] for r in results]
        cells = [title, *map(_percent, values)]
        if compare:
            a, b = values
            cells.append("n/a" if a is None or b is None else f"{100 * (b - a):+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    metrics = results[0]["metrics"]
    counts = f"{metrics['questions']} ({metrics['closed']} closed, {metrics['open']} open)"
    lines.append("| " + " | ".join(["questions", *[counts] * len(results)] + ([""] if compare else [])) + " |")
    errors = [r["metrics"]["errors"] for r in results]
    if any(errors):
        lines.append("| " + " | ".join(["errors (scored as empty)", *map(str, errors)] + ([""] if compare else []))
                     + " |")
    return "\n".join(lines) + "\n"



EXAMPLE = """example, the tiny model before and after `make train` (which writes examples/data.zip and trained.tar):
  mkdir -p trained && tar -xf trained.tar -C trained
  idefics-cog evaluate examples/data.zip --base weights/tiny/base --adapter none --compare-lora-weights trained"""


def parse_args(argv: list[str] | None, prog: str = "idefics-cog evaluate") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate IDEFICS on a dataset (a .zip/.tar holding data.jsonl and its images) with the medical "
                    "VQA metrics, in one configuration or two side by side (--compare-*). Weight sources are local "
                    "directories, https URLs of .tar/.zip archives, or hub ids owner/name[@revision]; "
                    "IDEFICS_CACHE_DIR, IDEFICS_QUANTIZATION and IDEFICS_DEVICE apply as for the server.",
    )
    parser.add_argument("dataset", type=Path, help="the dataset archive (see src/idefics_cog/training/data.py)")
    parser.add_argument("--base", help="the base model (default: IDEFICS_BASE_WEIGHTS, else idefics-9b-instruct)")
    parser.add_argument("--adapter-weights", help="what `medical` is, or `none` (default: IDEFICS_ADAPTER_WEIGHTS, "
                                                  "else MedIDEFICS)")
    for prefix, name in (("", "the configuration"), ("compare-", "a second configuration, side by side")):
        parser.add_argument(f"--{prefix}adapter", choices=ADAPTERS,
                            help=f"{name}: the adapter (default medical)")
        parser.add_argument(f"--{prefix}lora-weights", help=f"{name}: a LoRA adapter used instead of --{prefix}adapter"
                                                            f" (an https URL, a hub id, or a local directory)")
        parser.add_argument(f"--{prefix}lora-scale", type=float, help=f"{name}: the adapter's strength (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens per answer (default 128)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--json", type=Path, help="write the predictions and metrics of each configuration here")
    parser.add_argument("--markdown", type=Path, help="write the side-by-side table here (it is also printed)")
    args = parser.parse_args(argv)
    if not args.dataset.is_file():
        parser.error(f"dataset: {args.dataset} is not a file")
    if args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--max-new-tokens and --limit must be positive")

    def configuration(prefix: str) -> Configuration:
        values = [getattr(args, f"{prefix}{field}") for field in ("adapter", "lora_weights", "lora_scale")]
        return Configuration(values[0] or "medical", values[1] or "", 1.0 if values[2] is None else values[2])

    args.configurations = [configuration("")]
    if any(getattr(args, f"compare_{field}") is not None for field in ("adapter", "lora_weights", "lora_scale")):
        args.configurations.append(configuration("compare_"))
        if args.configurations[0] == args.configurations[1]:
            parser.error("the two configurations are the same")
    return args


def main(argv: list[str] | None = None, prog: str = "idefics-cog evaluate") -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress on stderr; stdout is the table
    for name in ("idefics_cog.serving.engine", "idefics_cog.serving.jobs"):  # not one line per generation
        logging.getLogger(name).setLevel(logging.WARNING)
    from idefics_cog.training.data import load_dataset
    from idefics_cog.serving.service import Service

    settings = Settings.from_env()
    base = args.base or settings.base_weights
    adapter_weights = settings.adapter_weights if args.adapter_weights is None else args.adapter_weights
    adapter_weights = "" if adapter_weights.lower() in ("", "none") else adapter_weights
    uses_medical = any(c.adapter == "medical" and not c.lora_weights for c in args.configurations)
    try:
        with tempfile.TemporaryDirectory(prefix="evaluate-") as workdir:
            examples = load_dataset(args.dataset, Path(workdir))[:args.limit]
            if uses_medical and not adapter_weights:
                log.warning("no adapter weights: `medical` is the base model alone")
            # Loaded as the server loads it; `medical` only when a configuration uses it.
            service = Service.from_settings(replace(settings, base_weights=base,
                                                    adapter_weights=adapter_weights if uses_medical else ""))
            results = evaluate(service.engine, service.adapters, examples, args.configurations, args.max_new_tokens)
    except (InputError, WeightsError) as exc:  # DatasetError is an InputError
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1
    table = markdown_table(results)
    if args.json:
        report = {"dataset": str(args.dataset), "base": base,
                  "medical": (adapter_weights or "none") if uses_medical else None,  # what `medical` was
                  "max_new_tokens": args.max_new_tokens, "configurations": results}
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":  # `python -m idefics_cog.evaluation.run`: an alias of `idefics-cog evaluate`
    sys.exit(main(prog="python -m idefics_cog.evaluation.run"))
