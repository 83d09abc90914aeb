"""`idefics-cog`, the one command-line tool: `tokens` (what the model sees), `download` (fill the weights folder
before `cog push`), `evaluate` (score a dataset). `python -m idefics_cog.weights` and `python -m
idefics_cog.evaluation.run` stay as aliases of the last two."""

import argparse
import json
import sys
from pathlib import Path

from idefics_cog.errors import InputError

USAGE_ERROR = 2
EXAMPLES = """examples:
  idefics-cog tokens --base weights/tiny/base --prompt "<image>What does this X-ray show?" --image examples/xray.png
  IDEFICS_BASE_WEIGHTS=HuggingFaceM4/idefics-9b-instruct idefics-cog download
  idefics-cog evaluate test.zip --adapter none --compare-adapter medical --markdown results.md
Each command's --help has more."""


def tokens(base: Path, prompt: str, images: list[Path], template: str = "instruct", system_prompt: str = "") -> dict:
    """What the model sees for this request: ids, pieces, and the text the tokenizer was given."""
    from idefics_cog.inputs.images import load_image
    from idefics_cog.inputs.prompt import build_segments, encode, render
    from idefics_cog.model.tokenizer import load_processor

    segments = build_segments(prompt, len(images), template, system_prompt)  # checks placeholders first: cheap
    processor = load_processor(base)
    loaded = []
    for index, path in enumerate(images):
        name = f"image[{index}]"
        if not Path(path).is_file():
            raise InputError(f"{name}: {path} is not a file")
        loaded.append(load_image(name, Path(path)))
    encoded = encode(segments, loaded, processor)
    ids = encoded.input_ids[0].tolist()
    tokenizer = processor.tokenizer
    return {
        "input_ids": ids,
        "pieces": [tokenizer.piece(i) for i in ids],
        "num_tokens": len(ids),
        "images": len(images),
        "text": tokenizer.bos_token + render(segments),
        "segments": [f"<image {s}>" if isinstance(s, int) else s for s in segments],
    }


def _download(argv: list[str], prog: str) -> int:
    from idefics_cog.weights.download import main
    return main(argv, prog)


def _evaluate(argv: list[str], prog: str) -> int:
    from idefics_cog.evaluation.run import main
    return main(argv, prog)


# Commands with their own parser: the arguments after the command's name go to it as they are.
DELEGATED = {"download": (_download, "fill the weights folder with the configured weights before `cog push`"),
             "evaluate": (_evaluate, "score the model on a dataset, one configuration or two side by side")}


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="idefics-cog", description="IDEFICS on Cog: the command-line tools.",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main.add_subparsers(dest="command", required=True, metavar="{tokens,download,evaluate}")
    command = commands.add_parser(
        "tokens", help="print the token ids the model will see for a prompt (JSON)",
        description="Print, as JSON, the exact input_ids the model sees for a prompt and their vocabulary pieces. "
                    "Reads only the tokenizer and preprocessor files of --base.",
        epilog='example:\n  idefics-cog tokens --base weights/tiny/base --prompt "<image>What does this X-ray show?" '
               '--image examples/xray.png', formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_argument("--base", required=True, type=Path,
                         help="checkpoint folder with tokenizer.json and preprocessor_config.json")
    command.add_argument("--prompt", required=True, help="the prompt; <image> placeholders bind the images in order")
    command.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                         help="an image file (repeat for several)")
    command.add_argument("--template", choices=["instruct", "raw"], default="instruct")
    command.add_argument("--system-prompt", default="")
    for name, (_, summary) in DELEGATED.items():
        commands.add_parser(name, help=summary, add_help=False)
    return main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        run, _ = DELEGATED[argv[0]]
        return run(argv[1:], f"idefics-cog {argv[0]}")
    args = parser().parse_args(argv)
    try:
        result = tokens(args.base, args.prompt, args.image, args.template, args.system_prompt)
    except InputError as error:
        print(f"idefics-cog {args.command}: {error}", file=sys.stderr)
        return USAGE_ERROR
    print(json.dumps(result, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
