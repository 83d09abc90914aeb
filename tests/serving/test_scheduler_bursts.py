"""Bursts prefilled together: the prompts waiting at a step run in one forward (`FastDecoder.prefill_together`,
all their images through the vision tower at once), and every request keeps exactly the tokens it gets alone."""

import pytest
import torch

from idefics_cog.serving import scheduler as scheduler_module
from idefics_cog.serving.decoder import FastDecoder, unwrap
from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Job, Sampling
from idefics_cog.serving.adapters import Adapters
from tests.support.engine import encoded, generate, submit_behind_a_stream, submit_together, tokens_of
from tests.support.helpers import noise_image


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=8)
    adapters = Adapters(engine, tmp_path_factory.mktemp("cache"))
    adapters.load_default(str(tiny_dir / "adapter"))
    return engine, adapters


def burst_requests(engine):
    """Different prompt lengths, 0, 1 and 2 images."""
    return [
        encoded(engine, "What does this X-ray show?", [noise_image(1)]),
        encoded(engine, "Compare <image> and <image>, in detail: size, shape and any shadow.",
                [noise_image(2), noise_image(3)]),
        encoded(engine, "Tell me about lungs."),
        encoded(engine, "Describe it.", [noise_image(4)]),
        encoded(engine, "A long question about the picture, " * 5, [noise_image(5)]),
        encoded(engine, "Hi?"),
    ]


def recorded(monkeypatch, decoder, engine):
    """Record the decoder's prefills (name, prompt count) and the vision tower's calls (images each)."""
    calls, vision = [], []
    for name in ("prefill", "prefill_together"):
        original = getattr(decoder, name)
        monkeypatch.setattr(decoder, name, lambda model, where, what, _name=name, _original=original: (
            calls.append((_name, len(what) if isinstance(what, list) else 1)), _original(model, where, what))[1])
    hook = unwrap(engine.model).model.vision_model.register_forward_hook(
        lambda module, args, kwargs, output: vision.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    return calls, vision, hook


def test_prefill_together_fills_each_slot_as_prefill_alone(engine):
    encs = burst_requests(engine)
    alone, together = (FastDecoder(engine.model, max_batch=8, max_images=4) for _ in range(2))
    slots = [5, 0, 2, 1, 7, 3]
    expected = [alone.prefill(engine.model, slot, enc) for slot, enc in zip(slots, encs)]
    got = together.prefill_together(engine.model, slots, encs)
    for logits, want in zip(got, expected):
        assert logits.shape == want.shape == (1, want.shape[-1]) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    for slot, enc in zip(slots, encs):
        n = enc.num_tokens
        torch.testing.assert_close(together.keys[:, slot, :, :n], alone.keys[:, slot, :, :n], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(together.values[:, slot, :, :n], alone.values[:, slot, :, :n], rtol=1e-4,
                                   atol=1e-4)
        assert together.image_lengths[slot] == alone.image_lengths[slot]
        torch.testing.assert_close(together.image_keys[:, slot], alone.image_keys[:, slot], rtol=1e-4, atol=1e-4)
        assert torch.equal(together.image_mask[slot], alone.image_mask[slot])
        assert torch.equal(together.image_gate[slot], alone.image_gate[slot])


@pytest.mark.slow
def test_a_burst_gives_each_request_its_tokens_alone_one_forward_per_adapter(served, monkeypatch):
    """Six requests with two adapters reach an idle server: consecutive requests with the same adapter are
    prefilled in one forward, their images through the vision tower in one call; every request gets exactly the
    greedy tokens of model.generate alone with its adapter."""
    engine, adapters = served
    encs = burst_requests(engine)
    names = ["medical", "medical", "medical", "none", "none", "medical"]
    sampling = Sampling(max_new_tokens=16, ignore_eos=True)
    expected = []
    for enc, name in zip(encs, names):
        adapters.select(name)
        expected.append(generate(engine, enc, sampling))
    selected = []
    jobs = [Job(enc, sampling, adapter=name, select_adapter=lambda name=name: selected.append(adapters.select(name)))
            for enc, name in zip(encs, names)]
    calls, vision, hook = recorded(monkeypatch, engine.scheduler.decoder, engine)
    try:
        received = submit_together(engine, jobs)
    finally:
        hook.remove()
    assert [tokens_of(items) for items in received] == expected
    assert selected == names
    assert calls == [("prefill_together", 3), ("prefill_together", 2), ("prefill", 1)]
    assert vision == [3, 2]  # each forward's images at once (the text-only prompts have none)


@pytest.mark.slow
def test_a_forward_that_fails_is_retried_one_prompt_at_a_time(served, monkeypatch):
    """Out of memory in a burst's forward: each of its prompts runs alone, and all get their tokens."""
    engine, adapters = served
    adapters.select("none")
    encs = burst_requests(engine)[:4]
    sampling = Sampling(max_new_tokens=10, ignore_eos=True)
    expected = [generate(engine, enc, sampling) for enc in encs]
    decoder = engine.scheduler.decoder
    calls, vision, hook = recorded(monkeypatch, decoder, engine)
    hook.remove()
    together = decoder.prefill_together

    def out_of_memory(model, slots, encodeds):
        together(model, slots, encodeds)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (simulated)")

    monkeypatch.setattr(decoder, "prefill_together", out_of_memory)
    received = submit_together(engine, [Job(enc, sampling) for enc in encs])
    assert [tokens_of(items) for items in received] == expected
    assert calls == [("prefill_together", 4)] + [("prefill", 1)] * 4
    assert engine.scheduler.rows == [] and engine.scheduler.starting == type(engine.scheduler.starting)()


@pytest.mark.slow
def test_a_burst_is_split_into_forwards_of_bounded_size(served, monkeypatch):
    engine, adapters = served
    adapters.select("none")
    encs = burst_requests(engine)
    monkeypatch.setattr(scheduler_module, "BURST_TOKENS", 40)
    sampling = Sampling(max_new_tokens=6, ignore_eos=True)
    expected = [generate(engine, enc, sampling) for enc in encs]
    seen = []
    together = engine.scheduler.decoder.prefill_together
    monkeypatch.setattr(engine.scheduler.decoder, "prefill_together", lambda model, slots, encodeds: (
        seen.append(sum(e.num_tokens for e in encodeds)), together(model, slots, encodeds))[1])
    received = submit_together(engine, [Job(enc, sampling) for enc in encs])
    assert [tokens_of(items) for items in received] == expected
    assert seen and all(tokens <= 40 for tokens in seen)


@pytest.mark.slow
def test_short_arrivals_behind_a_stream_share_a_forward_within_the_chunk(served, monkeypatch):
    """While a request streams, short prompts that fit one chunk (`chunk_tokens` tokens) in all go together;
    the stall bound holds: no forward between two decode steps holds more prompt tokens than the piece."""
    engine, adapters = served
    adapters.select("none")
    chunk = 64
    monkeypatch.setattr(engine.scheduler, "chunk_tokens", chunk)
    streaming = encoded(engine, "Hi?")
    short = [encoded(engine, f"Why {i}?", [noise_image(i)] if i % 2 else []) for i in range(4)]
    assert 2 * max(enc.num_tokens for enc in short) <= chunk
    requests = [(streaming, Sampling(max_new_tokens=30, ignore_eos=True))] + [
        (enc, Sampling(max_new_tokens=8, ignore_eos=True)) for enc in short]
    expected = [generate(engine, enc, s) for enc, s in requests]
    decoder, events = engine.scheduler.decoder, []
    for name in ("prefill", "prefill_together", "decode"):
        original = getattr(decoder, name)
        monkeypatch.setattr(decoder, name, lambda model, a, b, _name=name, _original=original: (
            events.append((_name, sum(e.num_tokens for e in b) if _name == "prefill_together" else
                           b.num_tokens if _name == "prefill" else 0)), _original(model, a, b))[1])
    received = submit_behind_a_stream(engine, [Job(enc, s) for enc, s in requests])
    assert [tokens_of(items) for items in received] == expected
    after = events[[name for name, _ in events].index("decode"):]
    assert any(name == "prefill_together" for name, _ in after)
    assert all(tokens <= chunk for name, tokens in after if name != "decode")
    assert all(not (a[0] != "decode" and b[0] != "decode") for a, b in zip(after, after[1:]))
