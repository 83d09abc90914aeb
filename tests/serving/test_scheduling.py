"""New requests do not freeze running streams: at most one prefill between two decode steps, and a request that
arrives while others decode starts within a bounded number of steps; every request keeps its own tokens."""

import threading

from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Job, Sampling
from tests.support.engine import encoded, generate
from tests.support.helpers import noise_image

ARRIVALS = 4


def test_arrivals_are_prefilled_one_per_decode_step(tiny_dir, monkeypatch):
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=8)
    decoder, events = engine.scheduler.decoder, []
    prefill, decode = decoder.prefill, decoder.decode

    def recorded_prefill(model, slot, enc):
        events.append(("prefill", enc))
        return prefill(model, slot, enc)

    def recorded_decode(model, tokens, positions):
        events.append(("decode", len(tokens)))
        return decode(model, tokens, positions)

    monkeypatch.setattr(decoder, "prefill", recorded_prefill)
    monkeypatch.setattr(decoder, "decode", recorded_decode)
    running = [encoded(engine, f"Question {i}?", [noise_image(i)]) for i in range(2)]
    arriving = [encoded(engine, "Compare <image> and <image>. " + "Describe both in detail. " * 4,
                        [noise_image(10 + i), noise_image(20 + i)]) for i in range(ARRIVALS)]
    long, short = Sampling(max_new_tokens=30, ignore_eos=True), Sampling(max_new_tokens=6, ignore_eos=True)
    arrival_jobs = [Job(enc, short) for enc in arriving]
    submitted_at = []  # the index in `events` when the arrivals were submitted

    def first_sink(item):
        if isinstance(item, list):
            first_tokens.append(item)
            if len(first_tokens) == 5:  # submitted together, from the scheduler's thread, between two steps
                submitted_at.append(len(events))
                for job in arrival_jobs:
                    engine.submit(job, received[job].append)

    first_tokens = []
    jobs = [Job(enc, long) for enc in running]
    received = {job: [] for job in jobs + arrival_jobs}
    gate = threading.Event()
    engine.generation_thread.submit(gate.wait)
    engine.submit(jobs[0], lambda item: (received[jobs[0]].append(item), first_sink(item)))
    engine.submit(jobs[1], received[jobs[1]].append)
    gate.set()
    for job in jobs + arrival_jobs:
        assert job.finished.wait(120)

    tokens = [[t for item in received[job] if isinstance(item, list) for t in item] for job in jobs + arrival_jobs]
    assert tokens == [generate(engine, enc, s) for enc, s in
                      [(e, long) for e in running] + [(e, short) for e in arriving]]
    kinds = [kind for kind, _ in events]
    assert "prefill prefill" not in " ".join(kinds)  # a decode step between any two prefills
    # Each arrival is prefilled within as many decode steps as there are arrivals before it (plus the next one).
    after = events[submitted_at[0]:]
    for index, enc in enumerate(arriving):
        at = next(i for i, (kind, what) in enumerate(after) if kind == "prefill" and what is enc)
        assert [kind for kind, _ in after[:at]].count("decode") <= index + 1
    assert max(n for kind, n in events if kind == "decode") == 2 + ARRIVALS  # they all joined the batch
