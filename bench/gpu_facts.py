"""What only a GPU can show, on the tiny model: where the engine puts the model, whether bitsandbytes changes 4-bit
weights on CUDA (on CPUs with AVX512-BF16 it repacks them at the first forward and `state_dict()` unpacks them
lossily: tests/model/test_loading.py), and whether the batched sampler picks what transformers' processors and
`torch.multinomial` pick for each row alone on that device (tests/serving/test_sampler.py). Run by bench/gpu.sh on
a lent CUDA machine; prints Markdown.

    python bench/gpu_facts.py [--device cuda|cpu]   # cpu: the same code path, for a dry run
"""

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import torch  # noqa: E402

from idefics_dev import tiny  # noqa: E402
from idefics_cog.serving.engine import Engine  # noqa: E402
from idefics_cog.serving.sampler import BatchSampler  # noqa: E402
from idefics_cog.serving.adapters import Adapters  # noqa: E402
from tests.support.helpers import negated_adapter  # noqa: E402
from tests.support.quantized import answer, changed, forced_logits, quantized_bytes  # noqa: E402
from tests.support.sampling import batched_against_alone  # noqa: E402


def four_bit_facts(base: Path, adapter: Path, device: str, scratch: Path) -> list[str]:
    engine = Engine.load(base, device, "4bit")
    loaded = quantized_bytes(engine.model)
    text, ids = answer(engine)
    after_forward = quantized_bytes(engine.model)
    logits = forced_logits(engine, ids)
    rows = [f"a forward changed {len(changed(loaded, after_forward))} of {len(loaded)} 4-bit layers"]

    adapters = Adapters(engine, scratch)
    adapters.load_default(str(negated_adapter(adapter, scratch / "negated")))
    adapters.select("none")
    rows.append(f"loading an adapter after forwards (the project's loader) changed "
                f"{len(changed(after_forward, quantized_bytes(engine.model)))} layers; same answer: "
                f"{answer(engine) == (text, ids)}; same logits: {torch.equal(forced_logits(engine, ids), logits)}")

    engine.model.state_dict()  # what PEFT's load_adapter does
    drifted = changed(after_forward, quantized_bytes(engine.model))
    drift = (forced_logits(engine, ids) - logits).abs().max().item()
    rows.append(f"`state_dict()` after forwards changed {len(drifted)} layers (largest logit change {drift:.3g})")
    return rows


def sampler_facts(device: str) -> list[str]:
    """The batched sampler against the processors, row by row, and the fact it leans on: a float32 tensor divided by
    a Python number (the processors' temperature and penalty) is on CUDA the product with the number's float32
    reciprocal, on CPU a true division (BatchSampler.divide)."""
    scores = torch.randn(64, 32002, device=device) * 4
    divisors = torch.full((64, 1), 0.7, device=device)
    divided = BatchSampler(1, [], torch.device(device)).divide(scores, divisors)
    rows = [f"scores / 0.7 (the processors' way) equal to the sampler's division: {torch.equal(divided, scores / 0.7)}"
            f", to a true division: {torch.equal(torch.div(scores, divisors), scores / 0.7)}"]
    differences = batched_against_alone(device, 32002)
    rows.append(f"batched sampling against each row alone (8 settings, 40 steps, vocabulary 32002): "
                f"{len(differences)} steps differ{': ' + differences[0] if differences else ''}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message=".*cast.*float16.*")
    built = tiny.build(ROOT / "weights" / "tiny")

    engine = Engine.load(built / "base", args.device)  # logs the placement decision
    rows = [f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, torch {torch.__version__}",
            f"tiny model (float): dtype {engine.dtype}, device map {getattr(engine.model, 'hf_device_map', None)}, "
            f"decode path {engine.decode_path}"]
    del engine
    rows += sampler_facts(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            rows += four_bit_facts(built / "base", built / "adapter", args.device, Path(scratch))
        except Exception as exc:  # a fact too: bitsandbytes without kernels for this CUDA, say
            rows.append(f"4-bit failed: {type(exc).__name__}: {exc}")
    print("\n".join(f"- {row}" for row in rows))


if __name__ == "__main__":
    main()
