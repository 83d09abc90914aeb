"""Concurrent predictions through the real Cog server (coglet): the async predictor and batched decoding.

The shared `server` runs as many predictions at once as cog.yaml's `concurrency.max` (the runner passes it as
COG_MAX_CONCURRENCY, as `cog build` does). Requests sent together are decoded together, and every answer must
equal the same request sent alone: batching (prompts and images of every size, per-request settings, lengths and
stops, adapters, a failing or cancelled neighbour) may not change a single token, and each stream sends its chunks
as they are generated.
"""

import re
import threading
import time

import pytest
import requests

from idefics_dev.cogrunner import CogServer, cog_yaml_concurrency
from tests.conftest import tiny_env
from tests.support.fileserver import FileServer
from tests.support.helpers import answer, data_uri, negated_adapter, new_tokens_of, noise_image, tar_bytes
from tests.support.images import png_header
from tests.support.server import send, succeeded, together

IMAGES = [data_uri(noise_image(seed)) for seed in (11, 12, 13, 14)]
# A raw prompt on which the tiny model (greedy, no adapter) never says <end_of_utterance> within 480 tokens.
LONG = {"prompt": "chest normal", "template": "raw", "max_new_tokens": 480, "adapter": "none"}


def pick_stop(text: str) -> tuple[str, int]:
    """A piece of `text` that first occurs after its start, as near its middle as can be: (stop, where it starts)."""
    for start in sorted(range(1, len(text) - 2), key=lambda i: abs(i - len(text) // 2)):
        for length in range(3, 9):
            stop = text[start:start + length]
            if "," not in stop and stop.strip() == stop and text.find(stop) == start:
                return stop, start
    raise AssertionError(f"no usable stop sequence in {text!r}")


ONE_BY_ONE: dict[str, float] = {}


@pytest.fixture(scope="module")
def mixed(server):
    """Sixteen greedy requests that differ in every way a batch must handle, each with its answer sent alone."""
    story = {"prompt": "Tell me a story about the lungs.", "max_new_tokens": 40, "adapter": "none"}
    scan = {"prompt": "Describe <image> briefly.", "image": IMAGES[3], "max_new_tokens": 40, "adapter": "none"}
    early, early_at = pick_stop(answer(server, story))
    late, late_at = pick_stop(answer(server, scan))
    requests_ = [
        {"prompt": "What does this X-ray show?", "image": IMAGES[0], "max_new_tokens": 24},
        {"prompt": "Compare <image> and <image>.", "image": IMAGES[1], "images": [IMAGES[2]], "max_new_tokens": 32},
        {"prompt": "Tell me about lungs.", "max_new_tokens": 40},
        {**LONG, "max_new_tokens": 64},
        {"prompt": "Describe it.", "image": IMAGES[3], "max_new_tokens": 1},
        {"prompt": "What is shown?", "images": IMAGES[:3], "max_new_tokens": 16,
         "system_prompt": "You are a radiologist."},
        {"prompt": "Is there a fracture?", "image": IMAGES[2], "max_new_tokens": 30, "repetition_penalty": 1.3},
        {**story, "stop_sequences": early},
        {**scan, "stop_sequences": f"qqqq,{late}"},
        {**story, "stop_sequences": "@@@@"},
        {"prompt": "<image>Caption:", "template": "raw", "image": IMAGES[1], "max_new_tokens": 20},
        {"prompt": "lung " * 150 + "What now?", "max_new_tokens": 12},
        {"prompt": "What does this X-ray show?", "image": IMAGES[3], "max_new_tokens": 24},
        {"prompt": "What does this X-ray show?", "image": IMAGES[0], "max_new_tokens": 24},  # twin of the first
        {"prompt": "Is it normal?", "image": IMAGES[0], "max_new_tokens": 28, "temperature": 0.0, "top_k": 5},
        {"prompt": "Name three bones.", "max_new_tokens": 36, "top_p": 0.5},
    ]
    requests_ = [{"adapter": "none", **inputs} for inputs in requests_]
    started = time.monotonic()
    answers = [answer(server, inputs) for inputs in requests_]
    ONE_BY_ONE["mixed"] = time.monotonic() - started  # seconds to answer them one after the other
    assert answers[7] == answer(server, story)[:early_at] and answers[8] == answer(server, scan)[:late_at]
    assert len(answers[4]) > 0 and len(set(answers)) >= 12  # they really differ
    return list(zip(requests_, answers))


def test_the_server_runs_cog_yaml_concurrency(server):
    assert server.concurrency == cog_yaml_concurrency() == 16
    assert server.env["COG_MAX_CONCURRENCY"] == "16"


def test_requests_sent_together_each_equal_their_answer_sent_alone(server, mixed):
    assert len(mixed) == server.concurrency  # every slot taken at once: none of them is refused
    started = time.monotonic()
    results = together(server, [(inputs, i % 2 == 0) for i, (inputs, _) in enumerate(mixed)])
    took = max(result["ended"] for result in results) - started
    assert [result["code"] for result in results] == [200] * len(mixed)
    for i, ((inputs, expected), result) in enumerate(zip(mixed, results)):
        assert succeeded(result) == expected, (i, inputs)
    # They ran at the same time (each prediction's time overlaps the others') and were decoded together: all of
    # them take much less time than one after the other (the longest, 64 tokens, sets the pace of the batch).
    assert sum(result["result"]["metrics"]["predict_time"] for result in results) > 3 * took
    assert took < 0.7 * ONE_BY_ONE["mixed"], (took, ONE_BY_ONE)


def test_a_sampled_request_in_a_batch_repeats_with_its_seed(server, mixed):
    sampled = {"prompt": "Tell me about lungs.", "max_new_tokens": 24, "adapter": "none", "temperature": 0.9,
               "top_p": 0.9, "top_k": 40, "repetition_penalty": 2, "seed": 7}  # an integer, as JSON clients send
    results = together(server, [(sampled, True)] + [(inputs, False) for inputs, _ in mixed[:5]])
    assert succeeded(results[0]) == answer(server, sampled)
    for (inputs, expected), result in zip(mixed[:5], results[1:]):
        assert succeeded(result) == expected


# Each message starts with the input's name (after coglet's "Prediction failed: ...: InputError: ").
BAD = [
    ({"image": data_uri(png_header(60000, 60000)), "max_new_tokens": 8},
     r"(^|: )image: .* is 3600000000 pixels.*IDEFICS_MAX_IMAGE_PIXELS"),
    ({"images": [IMAGES[0]] * 9}, r"(^|: )image, images: 9 images given; the limit is 8"),
    ({"prompt": "<image> and <image>", "image": IMAGES[0]},
     r"(^|: )prompt: has 2 <image> placeholder\(s\) but 1 image"),
    ({"prompt": "lung " * 600}, r"(^|: )prompt: \d+ tokens .* do not fit the model's context of 512 tokens"),
    ({"lora_weights": "file:///etc/passwd"}, r"(^|: )lora_weights: 'file:///etc/passwd' is neither"),
]


def test_bad_requests_among_good_ones_fail_naming_the_input_and_change_nothing(server, mixed):
    good = [mixed[i] for i in (0, 1, 3, 7, 11)]
    calls = [(inputs, i % 2 == 0) for i, (inputs, _) in enumerate(good)]
    calls += [({**inputs, "adapter": "none"}, i % 2 == 1) for i, (inputs, _) in enumerate(BAD)]
    results = together(server, calls)
    for (inputs, expected), result in zip(good, results):
        assert succeeded(result) == expected, inputs
    for (_, message), result in zip(BAD, results[len(good):]):
        assert result["code"] == 200 and result["result"]["status"] == "failed", result["result"]
        assert re.search(message, result["result"]["error"]), result["result"]["error"]
    assert answer(server, mixed[0][0]) == mixed[0][1]


def test_streams_sent_together_each_send_their_chunks_as_they_are_generated(server):
    """Four server-sent event streams at once (batched together): each one's first chunk comes early in its own
    prediction, before any of the four has completed, and the rest follow as they are generated, not all at the
    end (what coglet 0.23.1 does with an async generator `predict`; docs/configuration.md, "Concurrency")."""
    calls = [{**LONG, "max_new_tokens": tokens} for tokens in (160, 200, 240, 280)]
    server.wait_ready(30)
    barrier, streams = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i):
        barrier.wait()
        times: dict = {"sent": time.monotonic(), "chunks": []}
        for event, data in server.stream(calls[i]):
            if event == "output":
                times["chunks"].append(time.monotonic())
            elif event == "completed":
                times.update(completed=time.monotonic(), status=data["status"])
        streams[i] = times

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [times["status"] for times in streams] == ["succeeded"] * len(calls)
    for times in streams:
        took, first = times["completed"] - times["sent"], times["chunks"][0] - times["sent"]
        assert first < took / 2, (first, took)  # measured ~0.05 s of 1.5-4 s; collected at the end: ~took
        spread = times["chunks"][-1] - times["chunks"][0]
        assert spread > took / 3, (spread, took)  # the chunks came over the prediction's time, not in one burst
    assert max(times["chunks"][0] for times in streams) < min(times["completed"] for times in streams)


def test_cancelling_one_stream_leaves_the_others_unchanged(server, mixed):
    others = [mixed[i] for i in (3, 2, 0, 11)]
    cancelled: dict = {}

    def cancel_on_first_chunk(event, data, out):
        if event == "output" and not cancelled:
            response = requests.post(f"{server.url}/predictions/{out['id']}/cancel", timeout=10)
            cancelled.update(status=response.status_code, at=time.monotonic())

    results: list = [None]
    thread = threading.Thread(target=lambda: results.__setitem__(0, send(server, LONG, True, cancel_on_first_chunk)))
    server.wait_ready(30)
    thread.start()
    results[1:] = together(server, [(inputs, i % 2 == 1) for i, (inputs, _) in enumerate(others)])
    thread.join(120)
    victim = results[0]
    assert cancelled["status"] == 200 and victim["result"]["status"] == "canceled", victim["result"]
    assert victim["result"]["output"] == victim["chunks"]  # the chunks it sent are kept
    assert new_tokens_of(server, victim["id"]) < LONG["max_new_tokens"]  # its generation stopped
    for (inputs, expected), result in zip(others, results[1:]):
        assert succeeded(result) == expected, inputs
    assert max(result["ended"] for result in results[1:]) > cancelled["at"]  # the others were still running
    assert answer(server, mixed[0][0]) == mixed[0][1]  # and the server goes on


def test_a_client_that_goes_away_leaves_the_others_unchanged(server, mixed):
    others = [mixed[i] for i in (3, 5, 9)]

    def hang_up_on_first_chunk(event, data, out):
        if event == "output":
            return False

    results = together(server, [(LONG, True, hang_up_on_first_chunk)] + [(inputs, i % 2 == 0) for i, (inputs, _) in
                                                                         enumerate(others)])
    assert results[0]["code"] == 200 and len(results[0]["chunks"]) == 1 and "result" not in results[0]
    for (inputs, expected), result in zip(others, results[1:]):
        assert succeeded(result) == expected, inputs
    assert answer(server, mixed[1][0]) == mixed[1][1]
    assert new_tokens_of(server, results[0]["id"]) < LONG["max_new_tokens"]  # the abandoned one stopped early
    assert "Slot poisoned" not in server.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def custom_adapter(tiny_dir, tmp_path_factory):
    """A second adapter for the tiny model (its B matrices negated), served over HTTP as a lora_weights URL."""
    folder = negated_adapter(tiny_dir / "adapter", tmp_path_factory.mktemp("negated") / "adapter")
    with FileServer() as files:
        yield files.add("/negated.tgz", tar_bytes(folder))


def test_requests_for_different_adapters_at_once_each_equal_their_answer_alone(server, custom_adapter):
    """medical, none and a custom lora_weights (loaded for the first time while the others run) at once: each
    request gets its own adapter, whatever the others run."""
    xray = {"prompt": "What does this X-ray show?", "image": IMAGES[0], "max_new_tokens": 20}
    lungs = {"prompt": "Tell me about lungs.", "max_new_tokens": 24}
    calls = [{**xray, "adapter": "medical"}, {**lungs, "adapter": "medical"},
             {**xray, "adapter": "none"}, {**lungs, "adapter": "none"},
             {**xray, "lora_weights": custom_adapter}, {**lungs, "lora_weights": custom_adapter},
             {**xray, "lora_weights": custom_adapter, "lora_scale": 0.5},
             {**xray, "adapter": "medical", "lora_scale": 0.0}]
    results = together(server, [(inputs, i % 2 == 0) for i, inputs in enumerate(calls)])
    answers = [succeeded(result) for result in results]
    assert answers == [answer(server, inputs) for inputs in calls]
    assert len({answers[0], answers[2], answers[4], answers[6]}) == 4  # four different adapters, four answers
    assert answers[7] == answers[2]  # medical at scale 0 is the base model


@pytest.fixture(scope="module")
def small_server(tiny_dir):
    """A server with 3 slots and batches of at most 2: the third request waits or runs in its own batch."""
    with CogServer(env={**tiny_env(tiny_dir), "COG_MAX_CONCURRENCY": "3", "IDEFICS_MAX_BATCH": "2",
                        "IDEFICS_ALLOW_PRIVATE_URLS": "1"}) as running:
        yield running


def test_a_request_over_capacity_gets_409_and_the_others_complete(small_server):
    assert small_server.concurrency == 3  # the caller's COG_MAX_CONCURRENCY wins over cog.yaml's
    calls = [{**LONG, "max_new_tokens": 200}, {"prompt": "Tell me about lungs.", "max_new_tokens": 120},
             {"prompt": "What does this X-ray show?", "image": IMAGES[0], "max_new_tokens": 120}]
    expected = [answer(small_server, inputs) for inputs in calls]
    started = threading.Barrier(len(calls) + 1, timeout=60)

    def wait_for_start(event, data, out):
        if event == "start":
            started.wait()

    results: list = [None] * len(calls)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, send(small_server, calls[i], True,
                                                                              wait_for_start)))
               for i in range(len(calls))]
    small_server.wait_ready(30)
    for thread in threads:
        thread.start()
    started.wait()  # all three slots are taken
    health = small_server.health()["status"]
    over = requests.post(f"{small_server.url}/predictions", json={"input": calls[2]}, timeout=30)
    for thread in threads:
        thread.join(120)
    assert health == "BUSY"
    assert over.status_code == 409 and "capacity" in over.text.lower(), over.text
    assert [succeeded(result) for result in results] == expected
    assert answer(small_server, calls[2]) == expected[2]  # and the refused request goes through afterwards


def test_cancelling_or_leaving_every_stream_of_a_full_server_frees_every_slot_at_once(server):
    """Every slot of the server streaming (BUSY, all in one batch); every client but two hangs up, the two are
    cancelled. Their generations stop within a few tokens, and as many new requests are accepted at once, with
    correct answers."""
    short = {"prompt": "Tell me about lungs.", "max_new_tokens": 8}
    expected = answer(server, short)
    health: list = []

    def full():  # all are generating: the server is full (read before any of them lets go)
        health.extend([server.health()["status"], time.monotonic()])

    slots = server.concurrency
    generating = threading.Barrier(slots, action=full, timeout=60)

    def leave(event, data, out):
        if event == "output":
            generating.wait()
            return False

    def cancel(event, data, out):
        if event == "output" and not out.get("cancelled"):
            generating.wait()
            out["cancelled"] = requests.post(f"{server.url}/predictions/{out['id']}/cancel", timeout=10)

    results = together(server, [(LONG, True, leave)] * (slots - 2) + [(LONG, True, cancel)] * 2)
    again = together(server, [(short, True)] * slots)
    log = server.log_path.read_text(errors="replace")
    assert health[0] == "BUSY"
    for result in results[-2:]:
        assert result["cancelled"].status_code == 200 and result["result"]["status"] == "canceled"
        assert result["result"]["output"] == result["chunks"]
    waited = max(result["accepted"] for result in again) - health[1]
    assert waited < 2, waited  # all accepted at once after they let go (measured < 0.1 s; LONG alone: 1-3 s)
    assert [succeeded(result) for result in again] == [expected] * slots
    for result in results:
        assert new_tokens_of(server, result["id"]) < LONG["max_new_tokens"]  # each stopped early
    assert "Slot poisoned" not in log


def test_cancelling_a_request_still_waiting_for_its_batch_ends_it_at_once(small_server):
    """Two requests fill the batch (IDEFICS_MAX_BATCH=2); a third has its Cog slot but waits for a batch slot, so
    `predict` has not returned yet and coglet cancels its coroutine itself. It ends `canceled` at once without
    generating a token, and the two others are unchanged."""
    other = {**LONG, "max_new_tokens": 300}
    expected = answer(small_server, other)
    generating = threading.Barrier(3, timeout=60)
    cancel: dict = {}

    def wait_for_output(event, data, out):
        if event == "output" and not out.get("counted"):
            out["counted"] = True
            generating.wait()

    def cancel_on_start(event, data, out):
        if event == "start":
            time.sleep(0.3)  # its inputs read, it has reached the scheduler's queue (the others take 1-2 s)
            cancel["response"] = requests.post(f"{small_server.url}/predictions/{out['id']}/cancel", timeout=10)
            cancel["at"] = time.monotonic()

    small_server.wait_ready(30)
    results: list = [None] * 2
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, send(small_server, other, True,
                                                                              wait_for_output)))
               for i in range(2)]
    for thread in threads:
        thread.start()
    generating.wait()  # the two others are generating: the batch is full, the next request waits
    waiting = send(small_server, LONG, True, cancel_on_start)
    for thread in threads:
        thread.join(120)
    assert cancel["response"].status_code == 200 and waiting["result"]["status"] == "canceled", waiting["result"]
    assert waiting["chunks"] == [] and waiting["ended"] - cancel["at"] < 1
    assert new_tokens_of(small_server, waiting["id"]) == 0  # "no token generated"
    assert [succeeded(result) for result in results] == [expected] * 2
    assert "Slot poisoned" not in small_server.log_path.read_text(errors="replace")
