"""Through the real Cog server (coglet), as a client of the hosted model would see it."""

import re

import pytest
import requests

from tests.support.helpers import answer, data_uri, noise_image
from tests.support.engine import CASES, run

XRAY = data_uri(noise_image(1))


def post(server, inputs):
    server.wait_ready(timeout=10)
    return requests.post(f"{server.url}/predictions", json={"input": inputs}, timeout=120)


def assert_still_serving(server, baseline_inputs, baseline_output):
    server.wait_ready(timeout=10)  # coglet reports BUSY (and answers 409) for a moment after each response
    assert answer(server, baseline_inputs) == baseline_output


def test_health_is_ready(server):
    assert server.health()["status"] == "READY"


def test_a_server_start_logs_no_noise(server):
    """Setup's log says what happened (weights, model, adapter) and nothing else: no warning-level line (Cog's own
    deprecations), no bitsandbytes "kernels" message, no Python warnings, no progress bars."""
    start = server.log_path.read_text().partition("now accepting requests")[0]
    assert "model loaded on cpu" in start  # the log of setup is there
    for noise in ('"level":"WARN"', "kernels", "Warning:", "deprecated", "Loading weights", "%|"):
        assert noise not in start, f"{noise!r} in the server's start log:\n{start}"


def test_openapi_carries_the_input_bounds(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    properties = schema["components"]["schemas"]["Input"]["properties"]
    assert properties["max_new_tokens"]["minimum"] == 1 and properties["max_new_tokens"]["maximum"] == 2048
    assert properties["temperature"]["maximum"] == 5.0
    assert properties["image"]["format"] == "uri"


@pytest.mark.parametrize("case", CASES)
def test_prediction_equals_the_engine(server, engine, case):
    text, images = CASES[case]
    inputs = {"prompt": text, "max_new_tokens": 20, "adapter": "none"}
    if images:
        inputs["image"] = data_uri(images[0])
        if len(images) > 1:
            inputs["images"] = [data_uri(image) for image in images[1:]]
    assert answer(server, inputs) == run(engine, text, images, max_new_tokens=20)


def test_default_prompt_with_only_an_image(server):
    """predict.py's prompt defaults to empty (so that `messages` can tell it was not given); the service asks the
    default question instead."""
    default = answer(server, {"image": XRAY, "max_new_tokens": 8})
    assert default and default == answer(server, {"image": XRAY, "max_new_tokens": 8,
                                                  "prompt": "What does this image show?"})


def test_server_sent_events_stream_the_same_text(server):
    inputs = {"image": XRAY, "max_new_tokens": 30}
    events = list(server.stream(inputs))
    chunks = [data["chunk"] for event, data in events if event == "output"]
    event, final = events[-1]
    assert events[0][0] == "start" and event == "completed" and final["status"] == "succeeded"
    assert len(chunks) > 1 and "".join(chunks) == "".join(final["output"]) == answer(server, inputs)


def test_out_of_range_input_is_a_422_naming_the_input(server):
    response = post(server, {"max_new_tokens": 100000})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "max_new_tokens"


BAD_REQUESTS = {
    "not an image": ({"image": data_uri(b"%PDF-1.4 not a picture", "application/pdf")},
                     "image: .* is not a readable image"),
    "more placeholders than images": ({"prompt": "<image> and <image>", "image": XRAY},
                                      r"prompt: has 2 <image> placeholder\(s\) but 1 image\(s\)"),
    "more images than the limit": ({"images": [XRAY] * 9}, r"image, images: 9 images given; the limit is 8"),
    "prompt longer than the context": ({"prompt": "lung " * 600},
                                       r"prompt: \d+ tokens .* do not fit the model's context of 512 tokens"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_fails_clearly_and_the_server_keeps_serving(server, case):
    baseline = {"image": XRAY, "max_new_tokens": 12}
    before = answer(server, baseline)
    inputs, message = BAD_REQUESTS[case]
    result = post(server, inputs).json()
    assert result["status"] == "failed"
    assert re.search(message, result["error"]), result["error"]
    assert_still_serving(server, baseline, before)


def test_idefics_engine_selects_the_decode_path_and_both_give_the_same_answer(server, tiny_dir):
    from idefics_dev.cogrunner import CogServer
    from tests.conftest import ADAPTER_LIMIT, tiny_env

    inputs = {"image": XRAY, "prompt": "What does this X-ray show?", "max_new_tokens": 24}
    env = {**tiny_env(tiny_dir), "IDEFICS_MAX_ADAPTER_BYTES": str(ADAPTER_LIMIT), "IDEFICS_ENGINE": "transformers"}
    with CogServer(env=env) as plain:
        assert "transformers decode path" in plain.health()["setup"]["logs"]
        assert answer(plain, inputs) == answer(server, inputs)
    assert "fast decode path" in server.health()["setup"]["logs"]


def test_a_bad_idefics_engine_is_refused_naming_it():
    from idefics_cog.config import Settings

    with pytest.raises(ValueError, match="IDEFICS_ENGINE must be one of auto, fast, transformers, got 'turbo'"):
        Settings.from_env({"IDEFICS_ENGINE": "turbo"})
