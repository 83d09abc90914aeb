"""Requests with different adapters and scales decoded in one batch: each row with its own adapter and scale, the
same tokens as the request alone on the plain path; and switching adapters never recompiles the decode step."""


import pytest

from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Job, Sampling
from idefics_cog.serving.adapters import Adapters
from tests.support.engine import (
    alone,
    encoded,
    other_adapter,
    selecting,
    submit_behind_a_stream,
    submit_together,
    tokens_of,
)
from tests.support.helpers import negated_adapter, noise_image


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    """A fast path with the medical adapter, and two custom adapters (local directories, as the tools load)."""
    engine = Engine.load(tiny_dir / "base", "cpu")
    adapters = Adapters(engine, tmp_path_factory.mktemp("cache"))
    adapters.load_default(str(tiny_dir / "adapter"))
    folder = tmp_path_factory.mktemp("custom")
    customs = [str(negated_adapter(tiny_dir / "adapter", folder / "negated")),
               str(other_adapter(tiny_dir / "base", folder / "other", seed=5))]
    return engine, adapters, customs


def choices(customs):
    """(adapter, lora_weights, lora_scale) of every row of the mixed batch: two scales of one adapter among them."""
    return [("medical", "", 1.0), ("none", "", 1.0), ("", customs[0], 1.0), ("", customs[1], 1.0),
            ("medical", "", 0.5), ("", customs[1], 1.7), ("none", "", 1.0), ("medical", "", 1.0)]


def prompts(engine, count):
    texts = ["What does this X-ray show?", "Tell me about lungs.", "Compare <image> and <image>.", "Describe it."]
    images = [[noise_image(1)], [], [noise_image(2), noise_image(3)], [noise_image(4)]]
    return [encoded(engine, texts[i % 4], images[i % 4]) for i in range(count)]


@pytest.mark.slow
def test_a_batch_mixing_adapters_and_scales_gives_each_request_its_tokens_alone(served):
    engine, adapters, customs = served
    rows = choices(customs)
    encs = prompts(engine, len(rows))
    sampling = Sampling(max_new_tokens=24, ignore_eos=True)
    expected = [alone(engine, adapters, enc, sampling, choice) for enc, choice in zip(encs, rows)]
    assert len({tuple(tokens) for tokens in expected[:4]}) == 4  # the adapters really answer differently
    assert expected[4] != expected[0] and expected[5] != expected[3]  # and so do the scales
    engine.scheduler.largest_batch = 0
    jobs = [Job(enc, sampling, adapter=choice, select_adapter=selecting(adapters, *choice))
            for enc, choice in zip(encs, rows)]
    got = [tokens_of(items) for items in submit_together(engine, jobs)]
    assert got == expected
    assert engine.scheduler.largest_batch == len(rows)  # all in one batch


@pytest.mark.slow
def test_prompts_prefilled_in_pieces_between_other_adapters_keep_their_own_adapter(served, monkeypatch):
    """Chunked prefill in a mixed batch: each prompt's pieces run between decode steps of rows with other adapters
    and scales (which read their adapters from their slots), and each request still gets its tokens alone."""
    engine, adapters, customs = served
    monkeypatch.setattr(engine.scheduler, "chunk_tokens", 5)
    rows = choices(customs)
    encs = prompts(engine, len(rows))
    assert all(enc.num_tokens > 5 for enc in encs)  # every prompt runs in several pieces
    sampling = Sampling(max_new_tokens=12, ignore_eos=True)
    expected = [alone(engine, adapters, enc, sampling, choice) for enc, choice in zip(encs, rows)]
    jobs = [Job(enc, sampling, adapter=choice, select_adapter=selecting(adapters, *choice))
            for enc, choice in zip(encs, rows)]
    # The first streams before the others arrive: theirs then run in pieces (a burst at an idle server runs whole).
    assert [tokens_of(items) for items in submit_behind_a_stream(engine, jobs)] == expected


@pytest.mark.slow
def test_cancelling_one_row_of_a_mixed_batch_leaves_the_others_unchanged(served):
    engine, adapters, customs = served
    rows = choices(customs)[:5]
    encs = prompts(engine, len(rows))
    sampling = Sampling(max_new_tokens=30, ignore_eos=True)
    expected = [alone(engine, adapters, enc, sampling, choice) for enc, choice in zip(encs, rows)]
    jobs = [Job(enc, sampling, adapter=choice, select_adapter=selecting(adapters, *choice))
            for enc, choice in zip(encs, rows)]
    cancelled = jobs[2]  # a custom adapter's row, in the middle of the batch's slots

    def cancel_after_ten(items):
        def sink(item):
            items.append(item)
            if sum(len(item) for item in items if isinstance(item, list)) == 10:
                cancelled.cancel()
        return sink

    got = [tokens_of(items) for items in submit_together(engine, jobs, {2: cancel_after_ten})]
    assert got[2] == expected[2][:len(got[2])] and 10 <= len(got[2]) < 30
    assert got[:2] + got[3:] == expected[:2] + expected[3:]


@pytest.mark.slow
def test_a_row_keeps_its_adapter_after_the_model_unloads_it_and_an_adapter_waits_for_room(served, tiny_dir, tmp_path):
    """With room for one custom adapter, the second one's load unloads the first while a request still decodes
    with it: that request keeps its adapter's columns and its tokens. The banks hold 16 + 8 rank columns: medical
    (16) decodes beside the rank-8 adapter, the negated one (16) waits until medical's request ends."""
    _, _, customs = served
    engine = Engine.load(tiny_dir / "base", "cpu", bank_rank=24)
    adapters = Adapters(engine, tmp_path / "cache", max_loaded=1)
    adapters.load_default(str(tiny_dir / "adapter"))
    rows = [("medical", "", 1.0), ("", customs[1], 1.0), ("", customs[0], 1.0)]
    encs = prompts(engine, len(rows))
    lengths = [8, 20, 20]
    expected = [alone(engine, adapters, enc, Sampling(max_new_tokens=n, ignore_eos=True), choice)
                for enc, n, choice in zip(encs, lengths, rows)]
    engine.scheduler.largest_batch = 0
    jobs = [Job(enc, Sampling(max_new_tokens=n, ignore_eos=True), adapter=choice,
                select_adapter=selecting(adapters, *choice)) for enc, n, choice in zip(encs, lengths, rows)]
    got = [tokens_of(items) for items in submit_together(engine, jobs)]
    assert got == expected
    assert list(adapters.custom) == [customs[0]]  # the rank-8 adapter was unloaded while its request decoded
    assert engine.scheduler.largest_batch == 2  # the third waited for room in the banks


@pytest.mark.slow
def test_an_adapter_on_more_layers_loaded_after_the_first_batch_gets_its_own_banks(served, tiny_dir, tmp_path):
    """The banks are made for medical's layers (q/k/v) by a first request; then an adapter that also targets o_proj
    and down_proj (layers in between) is loaded: a batch of both still gives each request its tokens alone."""
    _, _, customs = served
    engine = Engine.load(tiny_dir / "base", "cpu")
    adapters = Adapters(engine, tmp_path / "cache")
    adapters.load_default(str(tiny_dir / "adapter"))
    rows = [("medical", "", 1.0), ("", customs[1], 1.0), ("medical", "", 0.5), ("", customs[1], 0.5)]
    encs = prompts(engine, len(rows))
    sampling = Sampling(max_new_tokens=20, ignore_eos=True)
    first = Job(encs[0], sampling, select_adapter=selecting(adapters, *rows[0]))
    assert tokens_of(submit_together(engine, [first])[0]) == alone(engine, adapters, encs[0], sampling, rows[0])
    expected = [alone(engine, adapters, enc, sampling, choice) for enc, choice in zip(encs, rows)]
    jobs = [Job(enc, sampling, adapter=choice, select_adapter=selecting(adapters, *choice))
            for enc, choice in zip(encs, rows)]
    assert [tokens_of(items) for items in submit_together(engine, jobs)] == expected


