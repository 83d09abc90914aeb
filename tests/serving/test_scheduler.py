"""New requests do not freeze running streams: at most one prefill between two decode steps, and a request that
arrives while others decode starts within a bounded number of steps (a burst reaching an idle server, where no
request is past its first token, is prefilled whole first); every request keeps its own tokens."""

import threading

import pytest

from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Job, Sampling
from tests.support.engine import encoded, generate, submit_behind_a_stream, submit_together, tokens_of
from tests.support.helpers import noise_image

ARRIVALS = 4


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [128, 8], ids=["whole prompts", "prompts in pieces of 8 tokens"])
def test_arrivals_are_prefilled_one_per_decode_step(tiny_dir, monkeypatch, chunk):
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=8)
    engine.scheduler.chunk_tokens = chunk
    decoder, events = engine.scheduler.decoder, []
    prefill, decode = decoder.prefill, decoder.decode
    images, piece = decoder.prefill_images, decoder.prefill_chunk

    def record_prefill(enc):
        events.append(("prefill", enc))

    def recorded_prefill(model, slot, enc):
        record_prefill(enc)
        return prefill(model, slot, enc)

    def recorded_images(model, slot, enc):
        record_prefill(enc)
        return images(model, slot, enc)

    def recorded_piece(model, slot, enc, start, end):
        record_prefill(enc)
        return piece(model, slot, enc, start, end)

    def recorded_decode(model, tokens, positions):
        events.append(("decode", len(tokens)))
        return decode(model, tokens, positions)

    monkeypatch.setattr(decoder, "prefill", recorded_prefill)
    monkeypatch.setattr(decoder, "decode", recorded_decode)
    monkeypatch.setattr(decoder, "prefill_images", recorded_images)
    monkeypatch.setattr(decoder, "prefill_chunk", recorded_piece)
    running = [encoded(engine, f"Question {i}?", [noise_image(i)]) for i in range(ARRIVALS)]
    arriving = [encoded(engine, "Compare <image> and <image>. " + "Describe both in detail. " * 4,
                        [noise_image(10 + i), noise_image(20 + i)]) for i in range(ARRIVALS)]
    long, short = Sampling(max_new_tokens=80, ignore_eos=True), Sampling(max_new_tokens=6, ignore_eos=True)
    arrival_jobs = [Job(enc, short) for enc in arriving]
    submitted_at = []  # the index in `events` when the arrivals were submitted

    def first_sink(item):
        if isinstance(item, list):
            first_tokens.append(item)
            if len(first_tokens) == 20:  # submitted together (from the scheduler's thread, between two steps)
                # once all the running streams decode
                submitted_at.append(len(events))
                for job in arrival_jobs:
                    engine.submit(job, received[job].append)

    first_tokens = []
    jobs = [Job(enc, long) for enc in running]
    received = {job: [] for job in jobs + arrival_jobs}
    gate = threading.Event()
    engine.torch_thread.submit(gate.wait)
    engine.submit(jobs[0], lambda item: (received[jobs[0]].append(item), first_sink(item)))
    for job in jobs[1:]:
        engine.submit(job, received[job].append)
    gate.set()
    for job in jobs + arrival_jobs:
        assert job.finished.wait(120)

    tokens = [[t for item in received[job] if isinstance(item, list) for t in item] for job in jobs + arrival_jobs]
    assert tokens == [generate(engine, enc, s) for enc, s in
                      [(e, long) for e in running] + [(e, short) for e in arriving]]
    # As many arrive as run: a decode step between any two of their prefills (pieces).
    after = events[submitted_at[0]:]
    assert all(not (a[0] == b[0] == "prefill") for a, b in zip(after, after[1:]))
    # Each arrival starts within as many decode steps as the prefill pieces of the arrivals before it (plus one).
    pieces = 1 if chunk >= arriving[0].num_tokens else 1 + -(-arriving[0].num_tokens // chunk)
    assert all(enc.num_tokens == arriving[0].num_tokens for enc in arriving)
    for index, enc in enumerate(arriving):
        at = next(i for i, (kind, what) in enumerate(after) if kind == "prefill" and what is enc)
        assert [kind for kind, _ in after[:at]].count("decode") <= index * pieces + 1
    assert sum(kind == "prefill" for kind, _ in after) == ARRIVALS * pieces
    if pieces == 1:  # one step each: they all joined the batch before the first of them ended
        assert max(n for kind, n in events if kind == "decode") == 2 * ARRIVALS


@pytest.mark.slow
def test_a_burst_reaching_an_idle_server_is_prefilled_whole_first(tiny_dir, monkeypatch):
    """Six requests reach an idle server together: no stream runs yet, so their prompts run whole, in one forward
    (`prefill_together`), before the first decode step (prompts longer than a piece too). Each keeps the tokens of
    model.generate."""
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=8)
    engine.scheduler.chunk_tokens = 8
    decoder, events = engine.scheduler.decoder, []
    for name in ("prefill", "prefill_together", "prefill_images", "prefill_chunk", "decode"):
        original = getattr(decoder, name)
        monkeypatch.setattr(decoder, name, lambda *args, _name=name, _original=original: (
            events.append(_name), _original(*args))[1])
    encs = [encoded(engine, f"Question {i}? Describe it in detail.", [noise_image(i)]) for i in range(6)]
    assert all(enc.num_tokens > 8 for enc in encs)
    sampling = Sampling(max_new_tokens=8, ignore_eos=True)
    received = submit_together(engine, [Job(enc, sampling) for enc in encs], timeout=60)
    assert [tokens_of(items) for items in received] == [generate(engine, enc, sampling) for enc in encs]
    assert events[:2] == ["prefill_together", "decode"] and set(events[2:]) == {"decode"}


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_a_prompt_prefilled_in_pieces_gives_the_tokens_of_generate(tiny_dir, monkeypatch, chunk):
    """Greedy and seeded sampling, one image, two images and text only, arriving while a request streams and
    decoded together: each request's tokens equal model.generate's for it alone, whatever the size of the
    prefill's pieces."""
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=4)
    engine.scheduler.chunk_tokens = chunk
    decoder, pieces = engine.scheduler.decoder, []
    piece = decoder.prefill_chunk
    monkeypatch.setattr(decoder, "prefill_chunk", lambda *args: (pieces.append(args[2]), piece(*args))[1])
    requests = [
        (encoded(engine, "Hi?"), Sampling(max_new_tokens=40, ignore_eos=True)),  # streams while the others arrive
        (encoded(engine, "What does this X-ray show?", [noise_image(1)]), Sampling(max_new_tokens=20)),
        (encoded(engine, "Compare <image> and <image>.", [noise_image(2), noise_image(3)]),
         Sampling(max_new_tokens=20, temperature=0.9, top_k=30, repetition_penalty=1.2, seed=5)),
        (encoded(engine, "Tell me about lungs.", []), Sampling(max_new_tokens=20, ignore_eos=True)),
    ]
    assert all(enc.num_tokens > chunk for enc, _ in requests[1:])
    received = submit_behind_a_stream(engine, [Job(enc, s) for enc, s in requests])
    assert [tokens_of(items) for items in received] == [generate(engine, enc, s) for enc, s in requests]
    assert all(any(enc is seen for seen in pieces) for enc, _ in requests[1:])  # each ran in pieces


@pytest.mark.slow
def test_a_fault_in_a_piece_of_a_prefill_fails_that_request_alone(tiny_dir, monkeypatch):
    """A long prompt's prefill fails in its second piece while others run and wait: it alone ends, with the
    stage named; the others keep their tokens, and the next request takes its slot."""
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=2)
    engine.scheduler.chunk_tokens = 8
    encs = [encoded(engine, f"Question {i}? Describe it in detail.", [noise_image(i)]) for i in range(4)]
    sampling = Sampling(max_new_tokens=10, ignore_eos=True)
    expected = [generate(engine, enc, sampling) for enc in encs]
    piece = engine.scheduler.decoder.prefill_chunk

    def broken(model, slot, enc, start, end):
        if enc is encs[1] and start > 0:
            raise RuntimeError("shape mismatch (simulated)")
        return piece(model, slot, enc, start, end)

    monkeypatch.setattr(engine.scheduler.decoder, "prefill_chunk", broken)
    received = submit_behind_a_stream(engine, [Job(enc, sampling) for enc in encs], timeout=60)
    assert received[1] and "prefilling the prompt failed: RuntimeError: shape" in str(received[1][-1])
    for index in (0, 2, 3):
        assert tokens_of(received[index]) == expected[index]
    assert engine.scheduler.rows == [] and engine.scheduler.prefilling is None


def test_a_request_cancelled_during_its_prefill_ends_there(tiny_dir, monkeypatch):
    """Cancelled after its images' piece: no token, its prefill stops, the running request keeps its tokens."""
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=2)
    engine.scheduler.chunk_tokens = 8
    encs = [encoded(engine, f"Question {i}? Describe it in detail.", [noise_image(i)]) for i in range(2)]
    sampling = Sampling(max_new_tokens=12, ignore_eos=True)
    expected = generate(engine, encs[0], sampling)
    jobs = [Job(enc, sampling) for enc in encs]
    images, pieces = engine.scheduler.decoder.prefill_images, []

    def cancel_the_second(model, slot, enc):
        if enc is encs[1]:
            jobs[1].cancel()
        return images(model, slot, enc)

    piece = engine.scheduler.decoder.prefill_chunk

    def recorded_piece(model, slot, enc, start, end):
        pieces.append(enc)
        return piece(model, slot, enc, start, end)

    monkeypatch.setattr(engine.scheduler.decoder, "prefill_images", cancel_the_second)
    monkeypatch.setattr(engine.scheduler.decoder, "prefill_chunk", recorded_piece)
    received = submit_behind_a_stream(engine, jobs, timeout=60)
    assert tokens_of(received[0]) == expected
    assert len(received[1]) == 1 and not isinstance(received[1][0], (list, BaseException))  # END only
    assert all(enc is not encs[1] for enc in pieces) and engine.scheduler.prefilling is None


def test_a_request_cancelled_during_its_last_piece_ends_once_without_a_token(tiny_dir, monkeypatch):
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=2)
    engine.scheduler.chunk_tokens = 8
    enc = encoded(engine, "Question? Describe it in detail, please.", [noise_image(3)])
    other, job = (Job(e, Sampling(max_new_tokens=12, ignore_eos=True)) for e in (encoded(engine, "Hi?"), enc))
    piece = engine.scheduler.decoder.prefill_chunk

    def cancelled_while_running(model, slot, encoded_, start, end):
        logits = piece(model, slot, encoded_, start, end)
        if end == encoded_.num_tokens:
            job.cancel()  # the client went away while the last piece ran
        return logits

    monkeypatch.setattr(engine.scheduler.decoder, "prefill_chunk", cancelled_while_running)
    received = submit_behind_a_stream(engine, [other, job], timeout=60)[1]
    assert len(received) == 1 and not isinstance(received[0], (list, BaseException))  # END once, no token
    assert engine.scheduler.rows == [] and engine.scheduler.prefilling is None
