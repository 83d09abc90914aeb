"""What `choices` costs against generating the same answer (issue 22): a closed question with one 224 px image,
scored over its candidates (one forward of the prompt and its image, one of all candidates packed after it), against
one generation of as many tokens as the chosen candidate has (`yes<end_of_utterance>`: 2), greedy; and one of 32
tokens, the verbose sentence a fine-tuned model tends to write instead.

  server      through the real Cog server (HTTP, the image as a data URI, output_format=json), one at a time
  engine      in-process: Engine.choose against Engine.stream of the same prompt, encoded beforehand

Candidates: 2 (yes, no), 8 single findings, 32 findings of a few words. Rounds alternate the cases; figures are
medians over --rounds, each against the generation's median from the same run.

    make tiny
    .venv/bin/python bench/choices.py [--rounds 7] [--preset bench-small]
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from bench.stats import machine, median_table  # noqa: E402
from idefics_dev.cogrunner import CogServer, post_prediction  # noqa: E402

QUESTION = "Is there a fracture?"
VERBOSE = 32  # a fine-tuned model's sentence-long answer to a closed question, generated instead
FINDINGS = ["normal", "fracture", "effusion", "pneumothorax", "cardiomegaly", "consolidation", "atelectasis", "mass"]
CANDIDATES = {
    "2 candidates (yes, no)": ["yes", "no"],
    "8 candidates (one finding each)": FINDINGS,
    "32 candidates (a few words each)": [f"{finding} of the {side} {part}" for finding in FINDINGS
                                         for side in ("left", "right") for part in ("lung", "lobe")],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--preset", default="bench-small")
    args = parser.parse_args()
    from idefics_dev import tiny
    from tests.support.helpers import data_uri, noise_image

    folder = ROOT / "weights" / args.preset
    tiny.build(folder, args.preset)
    picture = noise_image(1, (224, 224))
    env = {"IDEFICS_BASE_WEIGHTS": str(folder / "base"), "IDEFICS_ADAPTER_WEIGHTS": "none"}
    request = {"prompt": QUESTION, "image": data_uri(picture), "output_format": "json"}
    server_ms: dict[str, list[float]] = {}
    with CogServer(env=env) as server:
        def predict(inputs: dict) -> dict:
            started = time.perf_counter()
            response = post_prediction(f"{server.url}/predictions", {"input": {**request, **inputs}}, timeout=600)
            body = response.json()
            assert response.status_code == 200 and body["status"] == "succeeded", body
            result = json.loads("".join(body["output"]))
            result["ms"] = 1000 * (time.perf_counter() - started)
            return result

        tokens = predict({"choices": json.dumps(CANDIDATES["2 candidates (yes, no)"])})
        answer_tokens = max(row["tokens"] for row in tokens["choices"] if row["text"] == tokens["text"])
        generation = f"generate {answer_tokens} tokens"
        for _ in range(args.rounds):
            for name, texts in CANDIDATES.items():
                server_ms.setdefault(name, []).append(predict({"choices": json.dumps(texts)})["ms"])
            result = predict({"max_new_tokens": answer_tokens})
            server_ms.setdefault(generation, []).append(result["ms"])
            result = predict({"max_new_tokens": VERBOSE})  # the tiny models rarely end earlier
            server_ms.setdefault(f"generate up to {VERBOSE} tokens", []).append(result["ms"])
    engine_ms = engine_rounds(folder / "base", picture, answer_tokens, args.rounds, generation)
    print(f"machine: {json.dumps(machine())}\n")
    print(median_table(f"{args.preset}, through the Cog server", {generation: server_ms.pop(generation), **server_ms},
                       generation))
    print()
    print(median_table(f"{args.preset}, in-process engine", engine_ms, generation))


def engine_rounds(base: Path, picture, answer_tokens: int, rounds: int, generation: str) -> dict[str, list[float]]:
    from idefics_cog.inputs.prompt import build_segments
    from idefics_cog.serving.engine import Engine
    from idefics_cog.serving.jobs import Job, Sampling

    engine = Engine.load(base, "cpu")
    segments = build_segments(QUESTION, 1)
    encoded = engine.encode(segments, [picture])
    samples: dict[str, list[float]] = {generation: []}
    for _ in range(rounds + 1):  # the first round warms up
        started = time.perf_counter()
        "".join(engine.stream(Job(encoded, Sampling(max_new_tokens=answer_tokens, ignore_eos=True))))
        samples[generation].append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        "".join(engine.stream(Job(encoded, Sampling(max_new_tokens=VERBOSE, ignore_eos=True))))
        samples.setdefault(f"generate {VERBOSE} tokens", []).append(1000 * (time.perf_counter() - started))
        for name, texts in CANDIDATES.items():
            started = time.perf_counter()
            engine.choose(segments, [picture], texts)
            samples.setdefault(name, []).append(1000 * (time.perf_counter() - started))
    return {name: values[1:] for name, values in samples.items()}


if __name__ == "__main__":
    main()
