"""`choices`, `output_format=json` and `logprobs` through the real Cog server: the JSON result follows its documented
schema (docs/result.schema.json); a closed question's probabilities equal the tiny model's with its adapter loaded
alone by plain PEFT, for every adapter setting; reported log-probabilities do not change beside other requests; a bad
`choices` fails alone, naming the input and the limit."""

import json
import re
import time
from pathlib import Path

import jsonschema
import pytest
import requests
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import IdeficsForVisionText2Text

from idefics_cog.inputs.prompt import build_segments
from idefics_cog.serving.engine import Engine
from tests.support.fileserver import FileServer
from tests.support.helpers import answer, data_uri, negated_adapter, new_tokens_of, noise_image, tar_bytes
from tests.support.server import send, succeeded, together

SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "result.schema.json").read_text("utf-8"))
PICTURE = noise_image(41)
QUESTION = "Is there a fracture?"
CLOSED = {"prompt": QUESTION, "image": data_uri(PICTURE), "choices": '["yes", "no", "cannot tell"]'}
NEIGHBOUR = {"prompt": "Tell me about lungs.", "max_new_tokens": 40, "adapter": "none"}
LONG = {"prompt": "chest normal", "template": "raw", "max_new_tokens": 480, "adapter": "none"}  # all 480 uncancelled


def result_of(server, inputs: dict) -> dict:
    document = json.loads(answer(server, {**inputs, "output_format": "json"}))
    jsonschema.validate(document, SCHEMA)
    return document


@pytest.fixture(scope="module")
def custom_adapter(tiny_dir, tmp_path_factory):
    folder = negated_adapter(tiny_dir / "adapter", tmp_path_factory.mktemp("negated") / "adapter")
    with FileServer() as files:
        yield folder, files.add("/negated.tgz", tar_bytes(folder))


def plain_table(tiny_dir, adapter: Path | None, scale: float = 1.0) -> list[dict]:
    """The tiny model with `adapter` loaded alone by plain PEFT, scored in-process."""
    engine = Engine.load(tiny_dir / "base", "cpu", decode_path="transformers")
    if adapter is not None:
        model = PeftModel.from_pretrained(IdeficsForVisionText2Text.from_pretrained(tiny_dir / "base"), adapter)
        for module in model.modules():  # as PEFT's LoraLayer.set_scale, which Adapters.select calls
            if isinstance(module, LoraLayer):
                module.set_scale("default", scale)
        engine = Engine(model.eval(), engine.processor, engine.device, decode_path="transformers")
    return engine.choose(build_segments(QUESTION, 1), [PICTURE], ["yes", "no", "cannot tell"])


def test_a_closed_question_answers_with_the_probabilities_of_each_adapter_setting(server, tiny_dir, custom_adapter):
    folder, url = custom_adapter
    settings = [({"adapter": "medical"}, tiny_dir / "adapter", 1.0), ({"adapter": "none"}, None, 1.0),
                ({"lora_weights": url, "lora_scale": 0.5}, folder, 0.5)]
    tables = []
    for inputs, adapter, scale in settings:
        document = result_of(server, {**CLOSED, **inputs})
        expected = plain_table(tiny_dir, adapter, scale)
        assert [row["text"] for row in document["choices"]] == ["yes", "no", "cannot tell"]
        for ours, theirs in zip(document["choices"], expected):
            assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-4)
            assert ours["logprob"] == pytest.approx(theirs["logprob"], abs=1e-3)
            assert ours["tokens"] == theirs["tokens"]
        best = max(document["choices"], key=lambda row: row["probability"])["text"]
        assert document["text"] == best and document["finish_reason"] == "choice"
        assert document["usage"]["completion_tokens"] == 0 and document["usage"]["prompt_tokens"] > 3
        assert answer(server, {**CLOSED, **inputs}) == best  # the text output is the chosen candidate
        tables.append(tuple(row["logprob"] for row in document["choices"]))
    assert len(set(tables)) == 3


def test_a_generated_answer_as_json_with_its_logprobs(server):
    plain = answer(server, {**NEIGHBOUR, "max_new_tokens": 12})
    document = result_of(server, {**NEIGHBOUR, "max_new_tokens": 12, "logprobs": 4})
    assert document["text"] == plain
    assert document["finish_reason"] in ("length", "end_of_turn")
    assert document["usage"]["completion_tokens"] == len(document["logprobs"]) <= 12
    assert all(len(entry["top"]) == 4 for entry in document["logprobs"])
    assert "logprobs" not in result_of(server, {**NEIGHBOUR, "max_new_tokens": 12})
    stopped = result_of(server, {**NEIGHBOUR, "max_new_tokens": 12, "stop_sequences": plain.split()[1]})
    assert stopped["finish_reason"] == "stop_sequence" and stopped["text"] == plain[:plain.index(plain.split()[1])]


def test_logprobs_and_choices_are_unchanged_by_requests_beside_them(server):
    sampled = {"prompt": "Describe <image>.", "image": data_uri(noise_image(42)), "max_new_tokens": 16,
               "temperature": 0.9, "seed": 7, "logprobs": 3, "output_format": "json"}
    alone = [json.loads(answer(server, inputs)) for inputs in (sampled, {**CLOSED, "output_format": "json"})]
    neighbours = [NEIGHBOUR, {**NEIGHBOUR, "adapter": "medical", "repetition_penalty": 1.2}]
    results = together(server, [(sampled, True), ({**CLOSED, "output_format": "json"}, False),
                                *[(inputs, True) for inputs in neighbours]])
    beside = [json.loads(succeeded(result)) for result in results[:2]]
    assert beside[0]["text"] == alone[0]["text"]
    assert len(beside[0]["logprobs"]) == len(alone[0]["logprobs"]) == alone[0]["usage"]["completion_tokens"] > 0
    for ours, theirs in zip(beside[0]["logprobs"], alone[0]["logprobs"]):
        assert ours["id"] == theirs["id"] and ours["logprob"] == pytest.approx(theirs["logprob"], abs=1e-5)
        assert [top["id"] for top in ours["top"]] == [top["id"] for top in theirs["top"]]
    for ours, theirs in zip(beside[1]["choices"], alone[1]["choices"]):
        assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-6)


def failure(result: dict) -> str:
    assert result["code"] == 200 and result["result"]["status"] == "failed", result
    assert not result["chunks"]
    return result["result"]["error"]


def test_a_bad_choices_fails_alone_naming_the_input_and_the_limit(server):
    alone = answer(server, NEIGHBOUR)
    bad = [{**CLOSED, "choices": ",".join(f"finding {i}" for i in range(33))},
           {**CLOSED, "choices": json.dumps(["yes", "x" * 257])},
           {**CLOSED, "choices": '["yes", ""]'},
           {**CLOSED, "choices": "yes,no,yes"},
           {**CLOSED, "logprobs": 2},
           {**CLOSED, "choices": '["yes", {"no": 1}]'},
           {**CLOSED, "prompt": "lungs " * 600}]
    results = together(server, [(NEIGHBOUR, True), *[(inputs, True) for inputs in bad]])
    assert succeeded(results[0]) == alone
    errors = [failure(result) for result in results[1:]]
    assert errors[0].endswith("choices: 33 candidates; the limit is 32 (IDEFICS_MAX_CHOICES)")
    assert errors[1].endswith("is 257 characters; the limit is 256 (IDEFICS_MAX_CHOICE_CHARS)")
    assert errors[2].endswith("choices: item 2 is empty")
    assert errors[3].endswith("choices: 'yes' is given twice (items 1 and 3)")
    assert errors[4].endswith("logprobs: reports generated tokens, and choices generates none; each candidate's "
                              "log-probability is in the choices table of output_format=json")
    assert "choices: item 2 is dict, not a string" in errors[5]
    assert re.search(r"choices: the prompt \(\d+ tokens, 3 per image\) and the candidates \(at least 6 tokens in all\) "
                     r"do not fit the model's context of 512 tokens; send fewer or shorter candidates$", errors[6])
    assert send(server, {**CLOSED, "output_format": "xml"})["code"] == 422  # the schema's enum, checked by coglet
    assert succeeded(send(server, NEIGHBOUR)) == alone  # still serving


def test_choices_after_a_messages_conversation_score_as_after_its_raw_transcript(server):
    chat = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]},
            {"role": "assistant", "content": "A chest radiograph."},
            {"role": "user", "content": "Is there a fracture?"}]
    transcript = ("User: What is it?<image><end_of_utterance>\nAssistant: A chest radiograph.<end_of_utterance>\n"
                  "User: Is there a fracture?<end_of_utterance>\nAssistant:")
    common = {"image": data_uri(PICTURE), "choices": "yes,no"}
    by_messages = result_of(server, {**common, "messages": json.dumps(chat)})
    by_raw = result_of(server, {**common, "prompt": transcript, "template": "raw"})
    assert by_messages == by_raw


def test_a_cancelled_json_prediction_stops_its_generation_and_the_server_goes_on(server):
    """A JSON result is sent whole at the end: the cancel reaches the generation while `run` still waits for it."""
    check = answer(server, NEIGHBOUR)
    final, cancelled_at = None, None
    for event, data in server.stream({**LONG, "output_format": "json", "logprobs": 5}):
        if event == "start":
            time.sleep(0.5)  # generating
            assert requests.post(f"{server.url}/predictions/{data['id']}/cancel", timeout=10).status_code == 200
            prediction, cancelled_at = data["id"], time.monotonic()
        elif event == "completed":
            final, completed_at = data, time.monotonic()
    assert final["status"] == "canceled" and not final.get("output")
    assert completed_at - cancelled_at < 5
    assert new_tokens_of(server, prediction) < LONG["max_new_tokens"]
    assert answer(server, NEIGHBOUR) == check
