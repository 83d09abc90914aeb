"""Host time per streamed token: the old TextStream (the whole answer decoded again at each token) against the
incremental one (tokenizers' DecodeStream), for a 2,048-token answer on the genuine LLaMA vocabulary (issue 12).

The answer is English medical text with a few emoji, CJK characters and byte-fallback pieces, pushed one token at
a time with one stop sequence that never appears (so its hold-back runs at every token). Both ways must give the
same text as the non-streamed decode, or the script exits 1. Every figure is a median over --repeats runs.

    .venv/bin/python bench/textstream.py [--tokens 2048] [--repeats 7]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from bench.stats import machine  # noqa: E402
from idefics_cog.serving.textstream import TextStream, _Redecoded  # noqa: E402
from idefics_cog.model.tokenizer import load_tokenizer  # noqa: E402

LLAMA = ROOT / "tests" / "data" / "llama_tokenizer"
TEXT = ("The chest X-ray shows a small nodule in the right upper lobe, about 8 mm across; no effusion 😀, "
        "no pneumothorax. 結節 ✓ Follow-up CT in three months is advised.\n")
STOPS = ["Question:"]


class OldTextStream(TextStream):
    """The stream as it was before issue 12: every push decodes all ids so far."""

    def __init__(self, tokenizer, stop_sequences=()):
        super().__init__(tokenizer, stop_sequences)
        self.source = _Redecoded(tokenizer)


def answer_ids(tokenizer, tokens: int) -> list[int]:
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    return (ids * (tokens // len(ids) + 1))[:tokens]


def stream_seconds(kind, tokenizer, ids) -> tuple[float, str]:
    stream = kind(tokenizer, STOPS)
    started = time.perf_counter()
    text = "".join(stream.push([i]) for i in ids) + stream.finish()
    return time.perf_counter() - started, text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    tokenizer = load_tokenizer(LLAMA)
    ids = answer_ids(tokenizer, args.tokens)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    kinds = {"old: decode all ids per token": OldTextStream, "new: DecodeStream": TextStream}
    old = next(iter(kinds))
    times = {name: [] for name in kinds}
    for _ in range(args.repeats):
        for name, kind in kinds.items():  # round-robin, so that machine noise hits both alike
            seconds, text = stream_seconds(kind, tokenizer, ids)
            if text != expected:
                print(f"{name}: the streamed text differs from the non-streamed decode", file=sys.stderr)
                return 1
            times[name].append(seconds)
    print(f"## Streamed text, host time per token ({args.tokens}-token answer, LLaMA vocabulary)\n")
    print(f"machine: {machine()}; {args.repeats} runs, medians\n")
    print("| way | µs per token | whole answer ms | old / this |\n|---|---:|---:|---:|")
    old_median = statistics.median(times[old])
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median / args.tokens * 1e6:.1f} | {median * 1e3:.1f} | {old_median / median:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
