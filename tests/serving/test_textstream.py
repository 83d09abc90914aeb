import random
from pathlib import Path

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


# The incremental decoder (tokenizers' DecodeStream) against the non-streamed decode, on the tiny vocabulary and
# on the genuine LLaMA vocabulary (byte-fallback pieces, emoji, CJK, leading spaces, special ids mixed in).
LLAMA = Path(__file__).parents[1] / "data" / "llama_tokenizer"
SAMPLES = ["héllo wörld 😀 日本語のテキスト ✓", " leading space", "  two  spaces ", "a\n\nb\tc", "🦙🦙 emoji",
           "x<image>y<end_of_utterance> z", "don't , . ?", "no fracture seen. Question: is it normal"]
STOPS = [["Question:"], ["###", "four"], ["Question: "], ["😀"], ["\n\n"], [" z"], ["ö"]]


@pytest.fixture(scope="module", params=["tiny", "llama"])
def any_tokenizer(request, tiny_dir):
    return load_tokenizer(tiny_dir / "base" if request.param == "tiny" else LLAMA)


def random_answers(tokenizer, seed, count=400):
    """Token ids mixing random pieces, byte-fallback pieces, special ids and encoded samples."""
    rng = random.Random(seed)
    byte_ids = [i for i in range(len(tokenizer)) if tokenizer.convert_ids_to_tokens(i).startswith("<0x")]
    samples = [tokenizer(s, add_special_tokens=False).input_ids for s in SAMPLES]
    for _ in range(count):
        yield rng, random_answer(tokenizer, rng, byte_ids, samples)


def random_answer(tokenizer, rng, byte_ids, samples):
    ids = []
    for _ in range(rng.randint(1, 40)):
        kind = rng.random()
        if kind < 0.3 and byte_ids:
            ids.append(rng.choice(byte_ids))
        elif kind < 0.4:
            ids.append(rng.choice(tokenizer.all_special_ids))
        elif kind < 0.6:
            ids.extend(rng.choice(samples))
        else:
            ids.append(rng.randrange(len(tokenizer)))
    return ids


def cut_at_stop(text, stops):
    return text[:min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))]


@pytest.mark.slow
def test_the_incremental_stream_equals_the_full_decode_on_random_answers(any_tokenizer):
    for rng, ids in random_answers(any_tokenizer, seed=12):
        pieces, stream = stream_all(any_tokenizer, ids, step=rng.randint(1, 3))
        assert "".join(pieces) == any_tokenizer.decode(ids, skip_special_tokens=True), ids
        assert not stream.stopped


def test_the_incremental_stream_cuts_every_stop_sequence_like_the_full_decode(any_tokenizer):
    for rng, ids in random_answers(any_tokenizer, seed=13):
        stops = rng.choice(STOPS)
        pieces, stream = stream_all(any_tokenizer, ids, stop=stops, step=rng.randint(1, 3))
        full = any_tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == cut_at_stop(full, stops), (ids, stops)
        assert stream.stopped == any(s in full for s in stops)


@pytest.mark.parametrize("text, stops, expected", [
    ("no fracture seen. Question: is it normal", ["Question:"], "no fracture seen. "),
    ("one two### three four", ["###", "four"], "one two"),
    ("seen Quest", ["Question: "], "seen Quest"),
    ("a<image>b<end_of_utterance>", [], "a b"),  # the release-era tokens put "▁b" after <image>
])
def test_the_stop_cases_on_the_llama_vocabulary(text, stops, expected):
    tokenizer = load_tokenizer(LLAMA)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces, _ = stream_all(tokenizer, ids, stop=stops)
    assert "".join(pieces) == expected
    if not stops:  # whole words only (a held-back stop prefix may leave a space on its own)
        assert not any(p.endswith(" ") for p in pieces)


def test_a_byte_run_is_read_whole_as_the_full_decode_reads_it():
    # "j" as <0x6A> followed by an incomplete character: the decoder turns the whole run into U+FFFD, so "j" must
    # not be shown before the run ends; a valid run (an emoji) is shown once the next piece ends the run.
    tokenizer = load_tokenizer(LLAMA)
    term, j, e5, ad, word = 8489, 109, 232, 176, 12795
    stream = TextStream(tokenizer)
    assert [stream.push([i]) for i in (term, j, e5, ad, word)] + [stream.finish()] == \
        ["term", "", "", "", "\ufffd\ufffd\ufffd есть", ""]
    emoji = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "😀".encode()]
    stream = TextStream(tokenizer)
    assert [stream.push([i]) for i in [*emoji, word]] + [stream.finish()] == ["", "", "", "", "😀 есть", ""]
    stream = TextStream(tokenizer)
    assert "".join(stream.push([i]) for i in emoji[:3]) + stream.finish() == "\ufffd\ufffd\ufffd"


def test_pushing_a_token_does_not_decode_the_whole_answer(any_tokenizer, monkeypatch):
    calls = []
    real_decode = any_tokenizer.decode
    monkeypatch.setattr(any_tokenizer, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    ids = any_tokenizer("the chest image shows a small nodule " * 50, add_special_tokens=False).input_ids
    pieces, _ = stream_all(any_tokenizer, ids)
    assert calls == [] and "".join(pieces) == real_decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_a_tokenizer_that_cleans_up_spaces_is_decoded_whole(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir / "base")
    tokenizer.clean_up_tokenization_spaces = True
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    ids = tokenizer("don't , . ? fine", add_special_tokens=False).input_ids
    pieces, _ = stream_all(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == "don't,.? fine"
    llama = load_tokenizer(LLAMA)  # and with byte runs: an open run is held back as in the incremental path
    llama.clean_up_tokenization_spaces = True
    llama.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    for rng, ids in random_answers(llama, seed=15, count=200):
        pieces, _ = stream_all(llama, ids, step=rng.randint(1, 3))
        assert "".join(pieces) == llama.decode(ids, skip_special_tokens=True), ids


@pytest.mark.slow
def test_a_step_the_incremental_decoder_refuses_falls_back_to_the_full_decode(any_tokenizer, monkeypatch):
    """tokenizers' DecodeStream may refuse a step ("Invalid prefix encountered"); the answer is then decoded whole
    from there on, and the joined stream is still the full decode."""
    import idefics_cog.serving.textstream as textstream

    real = textstream.DecodeStream

    class Refusing:
        def __init__(self, **kwargs):
            self.inner, self.steps = real(**kwargs), 0

        def step(self, backend, ids):
            self.steps += 1
            if self.steps == 5:
                raise Exception("Invalid prefix encountered")
            return self.inner.step(backend, ids)

    monkeypatch.setattr(textstream, "DecodeStream", Refusing)
    for rng, ids in random_answers(any_tokenizer, seed=14, count=100):
        pieces, _ = stream_all(any_tokenizer, ids, step=rng.randint(1, 3))
        assert "".join(pieces) == any_tokenizer.decode(ids, skip_special_tokens=True), ids


@pytest.mark.slow
def test_the_stop_prefix_check_finds_what_the_definition_finds():
    """The longest tail of the text that is a proper prefix of a stop sequence, found with a few searches per
    token, on random texts and stops over a small alphabet (many overlaps)."""
    def longest(stops, text):
        return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    stream, rng = TextStream.__new__(TextStream), random.Random(0)
    for _ in range(20_000):
        stream.stop_sequences = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 7)))
                                 for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        assert stream._stop_prefix_length(text) == longest(stream.stop_sequences, text)


@pytest.mark.parametrize("value, message", [
    ("x" * 5000, r"stop_sequences: 5000 characters; the limit is 16 sequences of at most 256 characters"),
    (",".join(["ab"] * 17), r"stop_sequences: 17 sequences; the limit is 16 \(IDEFICS_MAX_STOP_SEQUENCES\)"),
    ("ok," + "y" * 257, r"stop_sequences: 'yyy.*' is 257 characters; the limit is 256"),
])
def test_stop_sequences_over_their_limits_are_refused(value, message):
    from idefics_cog.errors import InputError

    with pytest.raises(InputError, match=message):
        parse_stop_sequences(value)
    assert parse_stop_sequences(",".join(["z" * 256] * 16)) == ["z" * 256] * 16
