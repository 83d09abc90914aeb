"""Requests through the real Cog server: one or many at once (streamed or not), and the answers to compare them to."""

import threading
import time

from peft import PeftModel
from transformers import IdeficsForVisionText2Text

from idefics_cog.serving.engine import Engine
from idefics_dev.client import post_prediction
from idefics_dev.cogrunner import read_events
from tests.support import helpers
from tests.support.engine import run
from tests.support.helpers import data_uri, noise_image


def send(server, inputs: dict, stream: bool = False, on_event=None) -> dict:
    """One prediction: {"code": HTTP status, "result": the final response (or {"error": body}), "chunks": the
    streamed output events, "id": the prediction's id (streamed), "ended": monotonic time, "refused": 409s,
    "accepted": monotonic time of the response that was not a 409 (streamed: when the prediction started)}.
    A 409 (every slot busy) is retried for up to 30 s (client.post_prediction), as clients of a Cog container
    do: coglet frees a finished prediction's slot a moment after its response (docs/deployment.md, "HTTP 409"), so a
    burst right after another can find the slots still taken. The 409 itself is tested on
    its own (test_a_request_over_capacity_gets_409_and_the_others_complete)."""
    headers = {"Accept": "text/event-stream"} if stream else {}
    out: dict = {"chunks": [], "id": None, "refused": 0}

    def refused(_response) -> None:
        out["refused"] += 1

    response = post_prediction(f"{server.url}/predictions", {"input": inputs}, before_retry=refused,
                               headers=headers, stream=stream, timeout=300)
    out["accepted"] = time.monotonic()
    with response:
        out["code"] = response.status_code
        if response.status_code != 200:
            out["result"] = {"error": response.text}
        elif not stream:
            out["result"] = response.json()
        else:
            for event, data in read_events(response):
                if event == "start":
                    out["id"] = data["id"]
                elif event == "output":
                    out["chunks"].append(data["chunk"])
                elif event == "completed":
                    out["result"] = data
                if on_event is not None and on_event(event, data, out) is False:
                    break  # the client goes away
    out["ended"] = time.monotonic()
    return out


def together(server, calls: list[tuple]) -> list[dict]:
    """`send(server, *call)` for every call, all released at the same moment; results in order."""
    server.wait_ready(30)
    barrier, results = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i, call):
        barrier.wait()
        try:
            results[i] = send(server, *call)
        except Exception as exc:  # reported by the assertions, not lost in a thread
            results[i] = {"code": None, "result": {"error": repr(exc)}, "chunks": []}

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return results


def succeeded(result: dict) -> str:
    """The answer of a successful prediction (streamed: its chunks, which must join to the final output)."""
    assert result["code"] == 200, result["result"]
    final = result["result"]
    assert final.get("status") == "succeeded", final.get("error")
    text = "".join(final["output"] or [])
    if result["chunks"]:
        assert "".join(result["chunks"]) == text
    return text


PROMPT, IMAGE = "What does this X-ray show?", noise_image(1)


REQUEST = {"prompt": PROMPT, "image": data_uri(IMAGE), "max_new_tokens": 16}


def answer(server, **inputs) -> str:
    return helpers.answer(server, {**REQUEST, **inputs})


def reference(tiny_dir, adapter=None) -> str:
    """The answer of the tiny model loaded alone, with `adapter` loaded alone by plain PEFT."""
    engine = Engine.load(tiny_dir / "base", "cpu")
    if adapter is not None:
        model = IdeficsForVisionText2Text.from_pretrained(tiny_dir / "base")
        engine = Engine(PeftModel.from_pretrained(model, adapter).eval(), engine.processor, engine.device)
    return run(engine, PROMPT, [IMAGE], max_new_tokens=16)
