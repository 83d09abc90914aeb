"""`idefics-cog evaluate`: the model on a dataset (the training archive, or PathVQA/VQA-RAD-style parquet), in one
or two adapter configurations side by side, each question asked through a prediction's code path with greedy decoding
(in this process, or through deployed containers with --endpoint), a closed question scored both by its answer and
by its most probable candidate (`choices`). The CLI; the work is in the modules beside it."""

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from idefics_cog.config import Settings
from idefics_cog.errors import InputError, WeightsError
from idefics_cog.evaluation.configuration import ADAPTERS, Configuration
from idefics_cog.evaluation.journal import Journal
from idefics_cog.evaluation.report import markdown_table

# The modules that do the work (and import transformers, torch, pyarrow) are imported where used: `--help` is quick.

log = logging.getLogger(__name__)


EXAMPLE = """examples:
  # the tiny model before and after `make train` (which writes examples/data.zip and trained.tar):
  mkdir -p trained && tar -xf trained.tar -C trained
  idefics-cog evaluate examples/data.zip --base weights/tiny/base --adapter none --compare-lora-weights trained \\
      --html review.html
  # PathVQA's test split (parquet files from the hub, downloaded beforehand) through two deployed replicas:
  idefics-cog evaluate path-vqa/data --endpoint http://10.0.0.5:5000,http://10.0.0.6:5000 --concurrency 16 \\
      --adapter none --compare-adapter medical --results pathvqa.jsonl --html pathvqa.html"""


def parse_args(argv: list[str] | None, prog: str = "idefics-cog evaluate") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate IDEFICS on a dataset with the medical VQA metrics, in one configuration or two side by "
                    "side (--compare-*); a closed question is scored by its answer's yes/no and by the most probable "
                    "candidate (choices). Weight sources are local directories, https URLs of .tar/.zip archives, or "
                    "hub ids owner/name[@revision]; IDEFICS_CACHE_DIR, IDEFICS_QUANTIZATION and IDEFICS_DEVICE apply "
                    "as for the server.",
    )
    parser.add_argument("dataset", type=Path,
                        help="a .zip/.tar holding data.jsonl and its images (the training format), or a .parquet file "
                             "or a folder of them with columns image {bytes, path}, question, answer (PathVQA, "
                             "VQA-RAD as published on the Hugging Face hub)")
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
    parser.add_argument("--limit", type=int, help="evaluate only the first N questions")
    parser.add_argument("--choices", default="yes,no",
                        help="the candidates scored for a closed (yes/no) question, comma separated (default yes,no;"
                             " a question's own `choices` win); `none`: no scoring by choices")
    parser.add_argument("--endpoint", help="evaluate deployed containers instead of loading the model here: their "
                                           "URLs (http://host:5000), comma separated; requests are spread over them")
    parser.add_argument("--concurrency", type=int,
                        help="with --endpoint: requests at once, over all the URLs (default 4 per URL)")
    parser.add_argument("--results", type=Path,
                        help="append each answer to this JSONL file as it arrives; run the same command again to "
                             "resume an interrupted run (answers already there are not asked again)")
    parser.add_argument("--json", type=Path, help="write the predictions and metrics of each configuration here")
    parser.add_argument("--markdown", type=Path, help="write the side-by-side table here (it is also printed)")
    parser.add_argument("--html", type=Path, help="write the review sheet here: one self-contained HTML file with "
                                                  "each image, question and answer, and marks to export as CSV")
    parser.add_argument("--html-questions", type=int, default=200,
                        help="questions in the review sheet: the first N (default 200; 0: all); its chart and table "
                             "cover all")
    args = parser.parse_args(argv)
    if not args.dataset.exists():
        parser.error(f"dataset: {args.dataset} does not exist")
    if args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--max-new-tokens and --limit must be positive")
    if args.html_questions < 0:
        parser.error("--html-questions must be 0 (all) or more")
    choices = [c.strip() for c in args.choices.split(",")]
    args.closed_choices = () if args.choices.strip().lower() == "none" else tuple(choices)
    if args.closed_choices and (len(choices) < 2 or not all(choices) or len(set(choices)) < len(choices)):
        parser.error(f"--choices: give two different candidates or more, comma separated, or none; got "
                     f"{args.choices!r}")
    args.endpoints = []
    if args.endpoint is not None:
        if args.base or args.adapter_weights:
            parser.error("--base and --adapter-weights choose the model loaded here; with --endpoint the deployed "
                         "containers have theirs")
        args.endpoints = [u.strip().rstrip("/") for u in args.endpoint.split(",") if u.strip()]
        bad = [u for u in args.endpoints if not u.startswith(("http://", "https://"))]
        if not args.endpoints or bad or len(set(args.endpoints)) < len(args.endpoints):
            parser.error(f"--endpoint: give different http(s) URLs, comma separated; got {args.endpoint!r}")
        args.concurrency = args.concurrency or 4 * len(args.endpoints)
        if args.concurrency < len(args.endpoints):
            parser.error(f"--concurrency {args.concurrency} leaves some of the {len(args.endpoints)} endpoints idle: "
                         f"give at least one request at a time per URL")
    elif args.concurrency is not None:
        parser.error("--concurrency applies to --endpoint (the model loaded here answers one question at a time)")

    def configuration(prefix: str) -> Configuration:
        values = [getattr(args, f"{prefix}{field}") for field in ("adapter", "lora_weights", "lora_scale")]
        return Configuration(values[0] or "medical", values[1] or "", 1.0 if values[2] is None else values[2])

    args.configurations = [configuration("")]
    if any(getattr(args, f"compare_{field}") is not None for field in ("adapter", "lora_weights", "lora_scale")):
        args.configurations.append(configuration("compare_"))
        if args.configurations[0] == args.configurations[1]:
            parser.error("the two configurations are the same")
    for config in args.configurations if args.endpoints else ():
        if config.lora_weights and Path(config.lora_weights).exists():  # a container never reads a client's path
            parser.error(f"lora_weights: {config.lora_weights} is a local path; with --endpoint give an https URL "
                         f"or a hub id")
    return args


def run_local(args, items: list, journal: Journal) -> tuple[list[dict], dict]:
    from idefics_cog.evaluation import local
    from idefics_cog.serving.service import Service

    settings = Settings.from_env()
    base = args.base or settings.base_weights
    adapter_weights = settings.adapter_weights if args.adapter_weights is None else args.adapter_weights
    adapter_weights = "" if adapter_weights.lower() in ("", "none") else adapter_weights
    uses_medical = any(c.adapter == "medical" and not c.lora_weights for c in args.configurations)
    if uses_medical and not adapter_weights:
        log.warning("no adapter weights: `medical` is the base model alone")
    # Loaded as the server loads it; `medical` only when a configuration uses it.
    service = Service.from_settings(replace(settings, base_weights=base,
                                            adapter_weights=adapter_weights if uses_medical else ""))
    results = local.evaluate(service.engine, service.adapters, items, args.configurations, args.max_new_tokens,
                             args.closed_choices, journal)
    return results, {"base": base, "medical": (adapter_weights or "none") if uses_medical else None}


def main(argv: list[str] | None = None, prog: str = "idefics-cog evaluate") -> int:
    args = parse_args(argv, prog)
    from idefics_cog.evaluation import datasets, remote, sheet
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress on stderr; stdout is the table
    # Not one line per generation: warnings only (a fallback, a failure).
    for name in ("idefics_cog.serving.engine", "idefics_cog.serving.jobs", "idefics_cog.serving.scheduler"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="evaluate-") as workdir, Journal(args.results, {
                "max_new_tokens": args.max_new_tokens, "choices": list(args.closed_choices)}) as journal:
            items = datasets.load(args.dataset, Path(workdir), args.limit)
            if args.endpoints:
                results = remote.evaluate(args.endpoints, items, args.configurations, args.max_new_tokens,
                                          args.closed_choices, journal, args.concurrency)
                about = {"endpoints": args.endpoints}
            else:
                results, about = run_local(args, items, journal)
            if args.html:  # while the images are still extracted
                title = f"Review sheet: {args.dataset.name}, {' vs '.join(r['label'] for r in results)}"
                args.html.write_text(sheet.render(items, results, title, args.html_questions), encoding="utf-8")
    except (InputError, WeightsError, remote.RemoteError) as exc:  # DatasetError is an InputError
        print(f"evaluate: {exc}", file=sys.stderr)
        if args.results and not isinstance(exc, InputError):
            print(f"evaluate: the answers so far are in {args.results}: run the same command to go on",
                  file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.results:
            print(f"evaluate: interrupted; the answers so far are in {args.results}: run the same command to go on",
                  file=sys.stderr)
        return 130
    table = markdown_table(results)
    if args.json:
        report = {"dataset": str(args.dataset), **about, "max_new_tokens": args.max_new_tokens,
                  "choices": list(args.closed_choices), "configurations": results}
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":  # `python -m idefics_cog.evaluation.run`: an alias of `idefics-cog evaluate`
    sys.exit(main(prog="python -m idefics_cog.evaluation.run"))
