"""Mixed-adapter batches (issue 13, point 1): 16 concurrent requests with different adapters against 16 all-medical.

On the `bench-small` random IDEFICS (float32, CPU), with a random LoRA as `medical` (r=16 on q/k/v, like
MedIDEFICS) and four random custom adapters (local directories, loaded as `lora_weights` are). 16 requests (the
speed bench's prompts: one 224 px image, about 60 prompt tokens) go to decode_path='fast' at once, read by one event
loop, --new-tokens new tokens each (ignore_eos), in these mixes:

  all medical        the baseline
  medical/none       alternating
  4 custom           four different custom adapters, round-robin
  medical x 2 scales lora_scale 1.0 and 0.5, alternating

Aggregate tokens/s = all new tokens / wall time from the first submit to the last token. After a warm-up round, the
mixes run round-robin --repeats times; medians, and each against all-medical's median of the same run. Before
timing, the medical rows of the medical/none mix must equal the all-medical run's tokens for the same prompts
(float32: a row's tokens do not depend on its neighbours' adapters), else the script exits 1.

    .venv/bin/python bench/mixed_adapters.py [--repeats 5] [--new-tokens 64]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import transformers  # noqa: E402

from bench.speed import TORCH, make_request, new_engine, preset_model, stream_together  # noqa: E402
from bench.stats import machine, rate_table  # noqa: E402
from idefics_cog.serving.engine import Engine  # noqa: E402
from idefics_cog.serving.jobs import Job, Sampling  # noqa: E402
from idefics_cog.serving.adapters import Adapters  # noqa: E402
from idefics_dev.tiny import random_lora  # noqa: E402

REQUESTS = 16


def mixes(customs: list[str]) -> dict[str, list[tuple[str, str, float]]]:
    """Each mix: (adapter, lora_weights, lora_scale) per request."""
    def cycle(choices):
        return [choices[i % len(choices)] for i in range(REQUESTS)]

    return {"all medical": cycle([("medical", "", 1.0)]),
            "medical/none": cycle([("medical", "", 1.0), ("none", "", 1.0)]),
            "4 custom": cycle([("", custom, 1.0) for custom in customs]),
            "medical x 2 scales": cycle([("medical", "", 1.0), ("medical", "", 0.5)])}


def run_mix(engine: Engine, adapters: Adapters, prompts: list, mix: list, new_tokens: int):
    """Every request at once: aggregate new tokens/s, each request's tokens, the largest batch."""
    def job(prompt, choice):
        adapter, lora_weights, scale = choice
        return Job(prompt, Sampling(max_new_tokens=new_tokens, ignore_eos=True), adapter=choice,
                   select_adapter=lambda: adapters.select(adapter, lora_weights, scale, allow_local=True))

    jobs = [job(prompt, choice) for prompt, choice in zip(prompts, mix)]
    engine.scheduler.largest_batch = 0
    wall = stream_together(engine, jobs)
    return sum(len(j.stats.ids) for j in jobs) / wall, [j.stats.ids for j in jobs], engine.scheduler.largest_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench-small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    model, processor, what = TORCH.run(preset_model, args.preset)  # torch work on one thread
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = [str(TORCH.run(random_lora, model, tmp / f"adapter{seed}", seed, std=0.02))
                   for seed in range(5)]
        engine = new_engine(model, processor, decode_path="fast", max_batch=REQUESTS)
        adapters = Adapters(engine, tmp / "cache", max_loaded=4)
        adapters.load_default(folders[0])
        prompts = [engine.encode(r.segments, r.images)
                   for r in (make_request(engine, i) for i in range(REQUESTS))]
        runs = mixes(folders[1:])
        rates = {name: [] for name in runs}
        largest = {}
        for round_ in range(args.repeats + 1):  # round 0: warm-up (and the adapters' first load)
            tokens = {}
            for name, mix in runs.items():
                rate, tokens[name], largest[name] = run_mix(engine, adapters, prompts, mix, args.new_tokens)
                if round_:
                    rates[name].append(rate)
            if round_ == 0:
                medical = [t for t, choice in zip(tokens["medical/none"], runs["medical/none"])
                           if choice[0] == "medical"]
                if medical != tokens["all medical"][::2]:
                    sys.exit("the medical rows of the mixed batch differ from the all-medical batch")
            print(f"round {round_} done", file=sys.stderr, flush=True)
    info = machine()
    print(f"# Mixed-adapter batches\n\n{what}, float32 on CPU ({info['cpu']}, {info['cpus']} CPUs, "
          f"{info['torch_threads']} torch threads); torch {info['torch']}, transformers {info['transformers']}.  \n"
          f"{REQUESTS} concurrent requests, {args.new_tokens} new tokens each (ignore_eos), {args.repeats} rounds "
          f"after a warm-up, round-robin. Largest batch: "
          + ", ".join(f"{name} {n}" for name, n in largest.items()) + ".\n")
    print(rate_table("mix (16 concurrent)", rates, "all medical"))
    if args.json:
        args.json.write_text(json.dumps(dict(info=info, rates=rates, largest=largest), indent=2) + "\n")


if __name__ == "__main__":
    main()
