"""What one prediction costs on top of the bare model, on the embedded tiny IDEFICS on CPU.

The same greedy prediction (examples/xray.png, "What does this X-ray show?", the same generated tokens) is timed
three ways:

  recipe     idefics_dev.recipe.model_card_generate: processor -> model.generate -> decode (the baseline;
             the PIL image is decoded once, outside the timer; the engine's processor, from
             idefics_cog.model.tokenizer.load_processor, so the release-era tokens)
  predictor  predict.py's Predictor.run in-process: input checks, image file decode, encoding, the
             torch thread and the streamed text
  server     the real Cog server (coglet) over HTTP with the image as a data URI: client-side wall time of the
             POST /predictions (the readiness poll before it is not timed), and the server's metrics.predict_time

All three must give the same text (recipe and predictor the same token ids) before anything is timed. Each path
is warmed up, then the paths run round-robin; the table gives medians and minima in ms and each median against
the recipe's. The tiny model makes the model itself cheap, so this shows the fixed per-prediction overhead.

    make tiny
    .venv/bin/python bench/predict_overhead.py [--repeats 15] [--max-new-tokens 64] [--json PATH]
"""

import argparse
import asyncio
import base64
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import cog  # noqa: E402

from bench.stats import machine, median_table  # noqa: E402
from idefics_cog.inputs.images import load_image  # noqa: E402
from idefics_cog.inputs.prompt import build_segments  # noqa: E402
from idefics_dev.client import post_prediction  # noqa: E402
from idefics_dev.cogrunner import CogServer  # noqa: E402
from idefics_dev.recipe import model_card_generate  # noqa: E402
from idefics_dev.schema import run_defaults  # noqa: E402
from predict import Predictor  # noqa: E402

BASE = ROOT / "weights" / "tiny" / "base"
IMAGE = ROOT / "examples" / "xray.png"
PROMPT = "What does this X-ray show?"
GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
WARMUP = 2


def event_loop() -> asyncio.AbstractEventLoop:
    """An event loop on a thread of its own, as coglet runs async predictors: `predict` is awaited there and the
    generator it returns reads its pieces from there while this thread iterates it."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True, name="bench-loop").start()
    return loop


def make_paths(predictor: Predictor, server: CogServer, max_new_tokens: int) -> dict:
    """name -> function running one prediction: (seconds, text, token ids or None, server predict_time or None)."""
    engine = predictor.service.engine
    loop = event_loop()
    picture = load_image("image", IMAGE)  # the RGB image the predictor makes of the same file
    items = [picture if isinstance(s, int) else s for s in build_segments(PROMPT, 1)]
    args = {**run_defaults(Predictor), "prompt": PROMPT, "max_new_tokens": max_new_tokens, "seed": 0,
            "adapter": "none"}
    data_uri = f"data:image/png;base64,{base64.b64encode(IMAGE.read_bytes()).decode()}"

    def recipe():
        # On the engine's own torch thread: torch ops on two threads of one process use two OpenMP teams
        # that spin against each other on a small CPU, which would slow whichever path ran second.
        start = time.perf_counter()
        text, ids = engine.torch_thread.submit(
            model_card_generate, engine.model, engine.processor, items, max_new_tokens, **GREEDY).result()
        return time.perf_counter() - start, text, ids, None

    def predictor_path():
        image = cog.Path.validate(data_uri).convert()  # the file as coglet hands it over (serving/files.py)
        start = time.perf_counter()
        pieces = asyncio.run_coroutine_threadsafe(predictor.run(**{**args, "image": image}), loop).result()
        text = "".join(pieces)
        return time.perf_counter() - start, text, list(engine.last_stats.ids), None

    def server_path():
        server.wait_ready(30)  # coglet is BUSY for a moment after each response
        start = time.perf_counter()
        inputs = {name: value for name, value in args.items() if value is not None}  # JSON has no None for Cog
        response = post_prediction(f"{server.url}/predictions", {"input": {**inputs, "image": data_uri}}, timeout=600)
        seconds = time.perf_counter() - start
        body = response.json()
        assert response.status_code == 200 and body["status"] == "succeeded", body
        return seconds, "".join(body["output"]), None, body["metrics"]["predict_time"]

    return {"recipe": recipe, "predictor": predictor_path, "server": server_path}


def check_same_answer(paths: dict) -> tuple[str, list[int]]:
    (_, text, ids, _), (_, p_text, p_ids, _), (_, s_text, _, _) = (run() for run in paths.values())
    assert p_text == text, f"Predictor.run differs from the recipe:\n{p_text!r}\n{text!r}"
    assert p_ids == ids, f"Predictor.run generated other tokens:\n{p_ids}\n{ids}"
    assert s_text == text, f"the Cog server differs from the recipe:\n{s_text!r}\n{text!r}"
    return text, ids


def measure(paths: dict, repeats: int) -> dict:
    for run in paths.values():
        for _ in range(WARMUP):
            run()
    ms = {name: [] for name in paths} | {"server predict_time": []}
    for _ in range(repeats):
        for name, run in paths.items():
            seconds, _, _, predict_time = run()
            ms[name].append(1000 * seconds)
            if predict_time is not None:
                ms["server predict_time"].append(1000 * predict_time)
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds of the three paths (default 15)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    if not (BASE.parent / "COMPLETE").exists():
        sys.exit(f"no tiny model in {BASE.parent}: run `make tiny` first")

    env = {"IDEFICS_BASE_WEIGHTS": str(BASE), "IDEFICS_ADAPTER_WEIGHTS": "none"}  # the base model, as the recipe
    os.environ.update(env)
    predictor = Predictor()
    predictor.setup()
    with CogServer(env=env) as server:
        paths = make_paths(predictor, server, args.max_new_tokens)
        text, ids = check_same_answer(paths)
        ms = measure(paths, args.repeats)

    info = machine()
    print(f"# Per-prediction overhead, tiny IDEFICS on CPU\n\n"
          f"CPU {info['cpu']} ({info['cpus']} CPUs), torch {info['torch']} ({info['torch_threads']} threads), "
          f"transformers {info['transformers']}, Python {info['python']}.  \n"
          f"Prompt {PROMPT!r} + {IMAGE.relative_to(ROOT)}, greedy, max_new_tokens {args.max_new_tokens}: "
          f"{len(ids)} tokens generated, the same on all three paths (answer {text!r}).  \n"
          f"{WARMUP} warm-up runs per path, then {args.repeats} round-robin repeats.\n")
    labels = {"recipe": "recipe (model_card_generate)", "predictor": "Predictor.run (in-process)",
              "server": "Cog server, HTTP POST (client)", "server predict_time": "Cog server, metrics.predict_time"}
    print(median_table("path", {labels[name]: samples for name, samples in ms.items()}, labels["recipe"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            machine=info, prompt=PROMPT, image=str(IMAGE.relative_to(ROOT)), max_new_tokens=args.max_new_tokens,
            tokens=len(ids), token_ids=ids, answer=text, warmup=WARMUP, repeats=args.repeats, ms=ms,
        ), indent=2) + "\n")


if __name__ == "__main__":
    main()
