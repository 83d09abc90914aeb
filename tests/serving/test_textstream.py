import random

import pytest

from idefics_cog.serving.textstream import TextStream, parse_stop_sequences
from idefics_cog.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir / "base")


def stream_all(tokenizer, ids, stop=(), step=1):
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    return pieces + [stream.finish()], stream


def test_joined_stream_equals_the_full_decode(tokenizer):
    rng = random.Random(0)
    for trial in range(50):
        ids = [rng.randrange(3, tokenizer.vocab_size) for _ in range(rng.randint(1, 60))]
        pieces, _ = stream_all(tokenizer, ids, step=rng.randint(1, 3))
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_text_is_released_token_by_token_without_trailing_spaces(tokenizer):
    ids = tokenizer("the chest image shows a small nodule", add_special_tokens=False)["input_ids"]
    pieces, _ = stream_all(tokenizer, ids)
    released = [p for p in pieces if p]
    assert released[0] == "the" and len(released) >= 7
    assert not any(p.endswith(" ") for p in released)


def test_special_tokens_never_appear(tokenizer):
    ids = tokenizer("a<image>b<end_of_utterance>", add_special_tokens=False)["input_ids"]
    assert "<" not in "".join(stream_all(tokenizer, ids)[0])


def test_stop_sequence_ends_the_stream_without_the_stop_text(tokenizer):
    ids = tokenizer("no fracture seen. Question: is it normal", add_special_tokens=False)["input_ids"]
    pieces, stream = stream_all(tokenizer, ids, stop=["Question:"])
    assert "".join(pieces) == "no fracture seen. "
    assert pieces[-1] == ""  # all was released before the stop was seen
    assert stream.stopped


def test_partial_stop_sequence_is_held_back_then_released(tokenizer):
    stream = TextStream(tokenizer, ["Question: "])
    ids = tokenizer("seen Quest", add_special_tokens=False)["input_ids"]
    shown = "".join(stream.push([i]) for i in ids)
    assert "Quest" not in shown
    assert shown + stream.finish() == "seen Quest"


def test_text_after_the_stop_is_never_released(tokenizer):
    ids = tokenizer("one two### three four", add_special_tokens=False)["input_ids"]
    pieces, stream = stream_all(tokenizer, ids, stop=["###", "four"])
    assert "".join(pieces) == "one two"
    assert stream.push(tokenizer("more", add_special_tokens=False)["input_ids"]) == ""


def test_incomplete_character_is_held_back():
    class Decoder:  # decodes like a byte-fallback tokenizer in the middle of a multi-byte character
        def decode(self, ids, skip_special_tokens=True):
            return {1: "caf\ufffd", 2: "café ", 3: "café!"}[len(ids)]

    stream = TextStream(Decoder())
    assert stream.push([7]) == "caf"
    assert stream.push([8]) == "é"
    assert stream.push([9]) == "!"


@pytest.mark.parametrize("value, expected", [("", []), ("###", ["###"]), ("a,b,,c", ["a", "b", "c"])])
def test_parse_stop_sequences(value, expected):
    assert parse_stop_sequences(value) == expected
