"""The project encodes prompts to the tokens IDEFICS was released with (transformers 4.32.1), on the genuine LLaMA
vocabulary (tests/data/llama_tokenizer, built by tests/support/tools/build_llama_tokenizer.py; reference ids from
tests/support/tools/reference_ids.py)."""

import json
from pathlib import Path

import pytest
from transformers import AutoProcessor

from idefics_dev import tiny
from idefics_cog.inputs.prompt import build_segments, encode
from idefics_cog.model.tokenizer import ReleaseTokenizer, load_processor, load_tokenizer
from idefics_cog.training.examples import IGNORE, answer_labels
from tests.support.helpers import noise_image

DATA = Path(__file__).parents[1] / "data"
LLAMA = DATA / "llama_tokenizer"
REFERENCE = json.loads((DATA / "reference_ids.json").read_text(encoding="utf-8"))
CASES = {case["name"]: case for case in REFERENCE["cases"]}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"]


@pytest.fixture(scope="module")
def processor():
    return load_processor(LLAMA)


def test_the_reference_covers_the_shapes_the_issue_names():
    assert len(CASES) >= 30
    assert "4.32.1" in REFERENCE["generated_by"] and "0.13.3" in REFERENCE["generated_by"]
    medidefics = CASES["medidefics_template"]
    assert medidefics["segments"] == [f"User: {medidefics['prompt']}", 0, "<end_of_utterance>", "\nAssistant:"]
    assert {case["images"] for case in CASES.values()} == {0, 1, 2, 3}
    assert {case["template"] for case in CASES.values()} == {"instruct", "raw"}


def test_the_test_tokenizer_is_the_genuine_llama_vocabulary_with_the_idefics_tokens():
    tokenizer = load_tokenizer(LLAMA)
    assert tokenizer("Hello world").input_ids == [1, 15043, 3186]
    assert tokenizer.piece(29871) == "▁"
    assert tokenizer.convert_tokens_to_ids(tiny.IDEFICS_TOKENS) == [32000, 32001, 32002]
    assert len(tokenizer) == 32003


@pytest.mark.parametrize("name", sorted(CASES))
def test_project_ids_equal_the_release_era_ids(processor, name):
    case = CASES[name]
    segments = build_segments(case["prompt"], case["images"], case["template"], case["system_prompt"])
    assert segments == case["segments"]
    encoded = encode(segments, [noise_image(i) for i in range(case["images"])], processor)
    assert encoded.input_ids[0].tolist() == case["input_ids"]
    assert list(encoded.image_attention_mask.shape) == case["image_attention_mask_shape"]
    assert [processor.tokenizer.piece(i) for i in case["input_ids"]] == case["tokens"]


@pytest.mark.slow
def test_the_transformers_5_processor_gives_other_tokens():
    """The old path (AutoProcessor in transformers 5) loses the "▁" after special tokens: the check above is real."""
    old = AutoProcessor.from_pretrained(LLAMA)
    differ = [name for name, case in CASES.items()
              if encode(case["segments"], [noise_image(i) for i in range(case["images"])], old).input_ids[0].tolist()
              != case["input_ids"]]
    assert "medidefics_template" in differ
    assert len(differ) >= len(CASES) * 3 // 4, differ


def test_the_model_card_call_gets_the_release_era_tokens(processor):
    """recipe.model_card_generate calls processor(text=[items]); the loader's processor holds the same tokenizer."""
    case = CASES["medidefics_template"]
    items = [noise_image(0) if isinstance(s, int) else s for s in case["segments"]]
    inputs = processor(text=[items], add_end_of_utterance_token=False, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == case["input_ids"]


def test_decoding_skips_special_tokens_and_restores_text():
    tokenizer = load_tokenizer(LLAMA)
    ids = tokenizer("The lungs are clear.", add_special_tokens=False).input_ids
    assert tokenizer.decode([1, *ids, 32002, 2], skip_special_tokens=True) == "The lungs are clear."
    assert tokenizer.decode([*ids, 2], skip_special_tokens=False).endswith("</s>")


def test_answer_labels_cover_the_answer_with_release_era_offsets():
    """Training labels come from offsets; the prepended "▁" must not shift them onto the prompt."""
    tokenizer = load_tokenizer(LLAMA)
    text = "<s>User: What is it?<fake_token_around_image><image><fake_token_around_image><end_of_utterance>" \
           "\nAssistant: A chest X-ray.<end_of_utterance>"
    start = text.index("A chest")
    ids, labels = answer_labels(text, [(start, len(text))], tokenizer)
    learned = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert tokenizer.decode(learned) == "A chest X-ray.<end_of_utterance>"
    assert learned[-1] == 32002 and ids[-len(learned) - 1] != 32002


def test_the_tiny_tokenizer_has_the_released_layout_and_loads_the_same_way(tiny_dir):
    ours, real = (json.loads((d / "tokenizer.json").read_text()) for d in (tiny_dir / "base", LLAMA))
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        assert ours[key] == real[key]
    assert {k: v for k, v in ours["model"].items() if k not in ("vocab", "merges")} == \
           {k: v for k, v in real["model"].items() if k not in ("vocab", "merges")}
    strip = [{k: v for k, v in token.items() if k != "id"} for token in ours["added_tokens"]]
    assert strip == [{k: v for k, v in token.items() if k != "id"} for token in real["added_tokens"]]
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert (tiny_dir / "base" / name).read_text() == (LLAMA / name).read_text()
    assert type(load_tokenizer(tiny_dir / "base")) is type(load_tokenizer(LLAMA)) is ReleaseTokenizer
