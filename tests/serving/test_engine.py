import copy

import pytest
import torch

from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Sampling
from idefics_cog.errors import InputError
from idefics_cog.inputs.prompt import build_segments
from tests.support.engine import CASES, recipe, run
from tests.support.helpers import noise_image


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_streamed_answer_equals_the_model_card_recipe(engine, case):
    text, images = CASES[case]
    expected, expected_ids = recipe(engine, text, images, max_new_tokens=24)
    assert run(engine, text, images, max_new_tokens=24) == expected
    assert engine.last_stats.ids == expected_ids  # the same tokens, not only the same text


@pytest.mark.slow
def test_sampling_with_a_seed_equals_the_recipe_and_repeats(engine):
    text, images = CASES["one image"]
    settings = dict(max_new_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=42)
    first = run(engine, text, images, **settings)
    assert run(engine, text, images, **settings) == first
    torch.manual_seed(42)
    expected, _ = recipe(engine, text, images, max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.9,
                         top_k=50)
    assert first == expected
    others = {run(engine, text, images, **{**settings, "seed": seed}) for seed in range(5)}
    assert len(others) > 1  # the seed matters


@pytest.mark.slow
def test_images_change_the_answer(engine):
    answers = {run(engine, "Describe it.", [noise_image(seed)], max_new_tokens=16) for seed in range(4)}
    assert len(answers) > 1


def test_only_new_text_is_returned(engine):
    answer = run(engine, "What does this X-ray show?", [noise_image(1)], max_new_tokens=8)
    assert "User" not in answer and "X-ray" not in answer


def test_end_of_utterance_stops_generation(engine):
    stopping = _forced_engine(engine, "<end_of_utterance>")
    assert run(stopping, "Hi", [], max_new_tokens=20) == ""
    assert stopping.last_stats.ids == [engine.tokenizer.convert_tokens_to_ids("<end_of_utterance>")]


@pytest.mark.parametrize("token", ["<image>", "<fake_token_around_image>"])
def test_image_tokens_are_never_generated(engine, token):
    forced = _forced_engine(engine, token)
    run(forced, "Hi", [], max_new_tokens=10)
    banned = engine.tokenizer.convert_tokens_to_ids(token)
    assert len(forced.last_stats.ids) == 10 and banned not in forced.last_stats.ids


def _forced_engine(engine, token: str) -> Engine:
    """A copy of the tiny model that always puts `token` first, whatever the input."""
    model = copy.deepcopy(engine.model)
    token_id = engine.tokenizer.convert_tokens_to_ids(token)
    head = model.lm_head
    original = head.forward

    def forward(hidden):
        logits = original(hidden)
        logits[..., token_id] = logits.max() + 100.0
        return logits

    head.forward = forward
    return Engine(model, engine.processor, engine.device)


def test_stop_sequence_cuts_the_answer_and_stops_generating(engine):
    text, images = CASES["one image"]
    full = run(engine, text, images, max_new_tokens=40)
    full_tokens = len(engine.last_stats.ids)
    middle = len(full) // 2
    stop = full[middle:middle + 3]  # text from the middle of the answer
    cut = run(engine, text, images, max_new_tokens=40, stop_sequences=[stop])
    assert cut == full[: full.index(stop)]
    assert len(engine.last_stats.ids) < full_tokens


def test_closing_the_stream_stops_the_generation(engine):
    text, images = CASES["one image"]
    stream = engine.stream(engine.encode(build_segments(text, 1), images), Sampling(max_new_tokens=400))
    next(stream)
    stream.close()
    assert len(engine.last_stats.ids) < 100
    assert engine.last_stats.ended is not None


def test_prompt_longer_than_the_context_is_refused(engine):
    text = "lung " * engine.context_tokens
    with pytest.raises(InputError, match=rf"prompt: \d+ tokens .* context of {engine.context_tokens} tokens"):
        run(engine, text, [], max_new_tokens=4)


def test_max_new_tokens_is_lowered_to_fit_the_context(engine):
    assert engine.fit_to_context(engine.context_tokens - 10, 500) == 10


def test_integer_and_float_json_numbers_give_the_same_answer(engine):
    """JSON clients send `1` for 1.0 (and may send `8.0` for 8): each setting works as either, with the same
    tokens (transformers' logits processors refuse an int; range() a float)."""
    text, images = CASES["one image"]
    as_float = run(engine, text, images, max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=5,
                   repetition_penalty=2.0, seed=3)
    as_int = run(engine, text, images, max_new_tokens=8.0, temperature=1, top_p=1, top_k=5.0,
                 repetition_penalty=2, seed=3.0)
    assert as_int == as_float and len(engine.last_stats.ids) == 8


def test_a_number_with_a_fraction_is_refused_for_a_whole_number_setting():
    with pytest.raises(InputError, match=r"top_k: 2\.5 is not a whole number"):
        Sampling(top_k=2.5)
