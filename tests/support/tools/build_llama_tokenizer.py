"""Rebuild IDEFICS's tokenizer files from the genuine LLaMA vocabulary, in the layout of 2023 hub checkpoints.

The LLaMA-1/2 vocabulary (32,000 pieces) and its BPE merges ship inside npm's `llama-tokenizer-js` (base64 in
`llama-tokenizer.js`). This script writes `tests/data/llama_tokenizer/`: a `tokenizer.json` laid out as
transformers 4.32's LLaMA conversion wrote it (normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer,
BPE with byte fallback, decoder Replace/ByteFallback/Fuse/Strip), IDEFICS's three tokens as ids 32000-32002, and
the tokenizer/processor configs of an IDEFICS checkpoint, all written by `idefics_dev.tiny.write_processor_files`
(the tiny model's tokenizer uses the same writer). The JSON is in the serialization tokenizers 0.13 reads, so the
release-era stack (tests/support/tools/reference_ids.py) loads the same files.

`<s>`, `</s>` and `<unk>` are marked `"normalized": true`, as in LLaMA hub tokenizer.json files of 2023; the
IDEFICS tokens were added as special tokens (`"normalized": false`). Whether the hub's IDEFICS file marks `<s>` so
could not be checked offline; it only decides whether the text right after `<s>` starts with "▁" ("User" here).

Regenerate:
    npm pack llama-tokenizer-js            # llama-tokenizer-js-1.2.2.tgz
    PYTHONPATH=src .venv/bin/python tests/support/tools/build_llama_tokenizer.py llama-tokenizer-js-1.2.2.tgz
"""

import argparse
import base64
import re
import struct
import tarfile
from pathlib import Path

from idefics_dev import tiny

OUT = Path(__file__).resolve().parents[2] / "data" / "llama_tokenizer"


def read_llama_js(package: Path) -> str:
    """The text of llama-tokenizer.js, from the npm tarball or the file itself."""
    if package.suffix == ".tgz":
        with tarfile.open(package) as tar:
            return tar.extractfile("package/llama-tokenizer.js").read().decode("utf-8")
    return package.read_text(encoding="utf-8")


def vocab_and_merges(source: str) -> tuple[list[str], list[str]]:
    """Pieces by id (newline-separated, base64) and merges by priority (pairs of uint16 piece ids, base64)."""
    vocab_b64 = re.search(r'const llama_vocab_base64 = "([^"]+)"', source).group(1)
    merges_b64 = re.search(r'const llama_merges_binary = "([^"]+)"', source).group(1)
    pieces = base64.b64decode(vocab_b64).decode("utf-8").split("\n")
    raw = base64.b64decode(merges_b64)
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = [f"{pieces[ids[i]]} {pieces[ids[i + 1]]}" for i in range(0, len(ids), 2)]
    if len(pieces) != 32000 or pieces[29871] != tiny.SPACE or pieces[15043] != "▁Hello":
        raise ValueError(f"not the LLaMA vocabulary: {len(pieces)} pieces")
    return pieces, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, help="llama-tokenizer-js .tgz (npm pack) or its llama-tokenizer.js")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    pieces, merges = vocab_and_merges(read_llama_js(args.package))
    # The same writer as the tiny model's: one layout for both, checked here against the release-era stack.
    tiny.write_processor_files(args.out, {piece: i for i, piece in enumerate(pieces)}, merges, image_size=224)
    print(f"wrote {args.out}: {len(pieces)} pieces, {len(merges)} merges, ids 32000-32002 = {tiny.IDEFICS_TOKENS}")


if __name__ == "__main__":
    main()
