"""Token metrics through the real Cog server: each prediction's response carries, in `metrics`, the prompt's tokens
as the model saw them, the tokens it generated and the time to the first of them (as replicate/cog-vllm reports
them), its own also when several run at once, and a cancelled one the tokens it had generated."""

import pytest
import requests

from idefics_cog.model.tokenizer import load_tokenizer
from tests.support.helpers import data_uri, new_tokens_of, noise_image
from tests.support.server import succeeded, together

# Raw prompts on which the tiny model (greedy, no adapter) never says <end_of_utterance> early: max_new_tokens
# tokens are generated. Each with the text its tokenizer sees (an image is <fake><image><fake> there).
IMAGE = data_uri(noise_image(21))
SHORT = ({"prompt": "chest normal", "template": "raw", "adapter": "none"}, "chest normal")
WITH_IMAGE = ({"prompt": "<image>chest normal", "image": IMAGE, "template": "raw", "adapter": "none"},
              "<fake_token_around_image><image><fake_token_around_image>chest normal")
LONGER = ({"prompt": "chest normal " * 40, "template": "raw", "adapter": "none"}, "chest normal " * 40)


@pytest.fixture(scope="module")
def count_tokens(tiny_dir):
    """The tokens of a prompt's text as the model sees it: the tiny model's tokenizer, after <s>."""
    tokenizer = load_tokenizer(tiny_dir / "base")
    return lambda text: len(tokenizer(tokenizer.bos_token + text.strip(" "), add_special_tokens=False)["input_ids"])


def check_metrics(final: dict, prompt_tokens: int, new_tokens: int) -> None:
    metrics = final["metrics"]
    assert metrics["input_token_count"] == prompt_tokens, metrics
    assert metrics["output_token_count"] == new_tokens, metrics
    assert 0 < metrics["time_to_first_token"] < metrics["predict_time"], metrics


def test_a_prediction_reports_its_prompt_and_answer_tokens(server, count_tokens):
    inputs, text = WITH_IMAGE
    final = server.predict({**inputs, "max_new_tokens": 7})
    assert final["status"] == "succeeded", final.get("error")
    check_metrics(final, count_tokens(text), 7)


def test_an_answer_that_ends_itself_counts_the_tokens_it_generated(server, count_tokens):
    """An instruct answer that ends at <end_of_utterance> before max_new_tokens: that token is counted too, as
    the server's own log counts it."""
    final = server.predict({"prompt": "Is it normal?", "image": IMAGE, "max_new_tokens": 200})
    assert final["status"] == "succeeded", final.get("error")
    prompt = "User: Is it normal?<fake_token_around_image><image><fake_token_around_image><end_of_utterance>" \
             "\nAssistant:"
    check_metrics(final, count_tokens(prompt), new_tokens_of(server, final["id"]))


def test_concurrent_predictions_each_report_their_own_counts(server, count_tokens):
    """Three requests of different lengths at once (one streamed: the `completed` event carries the metrics)."""
    calls = [(WITH_IMAGE, 5, False), (SHORT, 23, True), (LONGER, 11, False)]
    results = together(server, [({**inputs, "max_new_tokens": n}, stream) for (inputs, _), n, stream in calls])
    for ((_, text), n, _), result in zip(calls, results):
        succeeded(result)
        check_metrics(result["result"], count_tokens(text), n)


def test_a_cancelled_prediction_reports_the_tokens_it_generated(server, count_tokens):
    """Its prompt and the tokens generated before the cancel stopped it (fewer than asked for)."""
    inputs, text = SHORT
    final, prediction, chunks = None, None, 0
    for event, data in server.stream({**inputs, "max_new_tokens": 480}):
        if event == "start":
            prediction = data["id"]
        elif event == "output":
            chunks += 1
            if chunks == 3:
                requests.post(f"{server.url}/predictions/{prediction}/cancel", timeout=10)
        elif event == "completed":
            final = data
    assert final["status"] == "canceled"
    metrics = final["metrics"]
    assert metrics["input_token_count"] == count_tokens(text), metrics
    assert 3 <= metrics["output_token_count"] < 480, metrics
    assert metrics["output_token_count"] == new_tokens_of(server, prediction), metrics
