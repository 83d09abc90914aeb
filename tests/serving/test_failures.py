"""One request's failure never harms another: a fault injected at each stage of the scheduler for one request,
with other requests running and waiting beside it (in-process: a fault cannot be caused from outside)."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from idefics_cog.serving import failures
from idefics_cog.serving.failures import GenerationError, device_lost
from idefics_cog.serving.jobs import Row
from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Job, Sampling
from idefics_cog.errors import InputError
from tests.support.helpers import noise_image
from tests.support.engine import encoded, generate

COUNT = 4  # requests sent together, two slots: two run while two wait
FAULTY = 1  # the request the fault is injected for


@pytest.fixture(scope="module")
def requests_(tiny_dir):
    """A two-slot engine, four different requests (one sampled), and each one's tokens when sent alone."""
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=2)
    encs = [encoded(engine, f"Question {i}?", [noise_image(i)]) for i in range(COUNT)]
    sampling = [Sampling(max_new_tokens=12, ignore_eos=True),
                Sampling(max_new_tokens=12, temperature=0.9, top_k=20, seed=3, ignore_eos=True),
                Sampling(max_new_tokens=8, repetition_penalty=1.5), Sampling(max_new_tokens=16)]
    expected = [generate(engine, enc, s) for enc, s in zip(encs, sampling)]
    return engine, encs, sampling, expected


def outcomes(engine, jobs: list[Job], sinks=None) -> list[tuple[list[int], BaseException | None]]:
    """Submit all jobs at once (the scheduler's thread held meanwhile); each job's (tokens, error)."""
    gate = threading.Event()
    engine.torch_thread.submit(gate.wait)
    received = [[] for _ in jobs]
    for index, (job, items) in enumerate(zip(jobs, received)):
        engine.submit(job, sinks[index] if sinks and sinks[index] else items.append)
    gate.set()
    assert all(job.finished.wait(60) for job in jobs), "a request never ended"
    return [([t for item in items if isinstance(item, list) for t in item],
             next((item for item in items if isinstance(item, BaseException)), None)) for items in received]


def check_only_the_faulty_one_failed(results, expected, message: str, faulty: int = FAULTY) -> None:
    for index, (tokens, error) in enumerate(results):
        if index == faulty:
            assert error is not None, "the faulty request succeeded"
            assert message in str(error), str(error)
        else:
            assert error is None, f"request {index} failed with the faulty one: {error!r}"
            assert tokens == expected[index], f"request {index}'s tokens changed"


def jobs_for(encs, sampling, **per_job) -> list[Job]:
    return [Job(enc, s, **{k: v[i] for k, v in per_job.items()}) for i, (enc, s) in enumerate(zip(encs, sampling))]


@pytest.mark.slow
def test_a_fault_while_selecting_the_adapter_fails_that_request_alone(requests_):
    """Every request selects its adapter before its prefill: the first fails there, the others select theirs."""
    engine, encs, sampling, expected = requests_
    selected = []

    def broken():
        raise KeyError("adapter table corrupted (simulated)")

    selectors = [lambda: selected.append(1)] * COUNT
    selectors[0] = broken
    results = outcomes(engine, jobs_for(encs, sampling, select_adapter=selectors))
    check_only_the_faulty_one_failed(results, expected, "selecting the adapter failed: KeyError", faulty=0)
    assert len(selected) == COUNT - 1  # every other request selected its own


@pytest.mark.parametrize("error, message, kind", [
    # An input error keeps its own message; a bug is reported as the server's, naming the stage.
    (InputError("prompt: 9999 tokens do not fit the model's context of 128 tokens"), "prompt: 9999 tokens", InputError),
    (AttributeError("'NoneType' object has no attribute 'convert' (simulated)"),
     "encoding the prompt failed: AttributeError", GenerationError),
], ids=["input error keeps its message", "bug fails that request alone"])
def test_an_error_while_encoding_fails_that_request_alone(requests_, error, message, kind):
    engine, encs, sampling, expected = requests_

    def failing():
        raise error

    prepares = list(encs)
    prepares[FAULTY] = failing
    results = outcomes(engine, [Job(p, s) for p, s in zip(prepares, sampling)])
    check_only_the_faulty_one_failed(results, expected, message)
    assert type(results[FAULTY][1]) is kind


def test_a_fault_in_a_prefill_fails_that_request_alone(requests_, monkeypatch):
    """The fault comes with the faulty request's prompt: alone or in a burst's forward (`prefill_together`, whose
    prompts the scheduler then retries one by one), it fails only that request."""
    engine, encs, sampling, expected = requests_
    decoder = engine.scheduler.decoder
    prefill, together, bursts = decoder.prefill, decoder.prefill_together, []

    def broken(model, slot, enc):
        if enc is encs[FAULTY]:
            raise RuntimeError("shape mismatch in a vision layer (simulated)")
        return prefill(model, slot, enc)

    def broken_together(model, slots, encodeds):
        bursts.append(len(encodeds))
        if any(enc is encs[FAULTY] for enc in encodeds):
            raise RuntimeError("shape mismatch in a vision layer (simulated)")
        return together(model, slots, encodeds)

    monkeypatch.setattr(decoder, "prefill", broken)
    monkeypatch.setattr(decoder, "prefill_together", broken_together)
    results = outcomes(engine, jobs_for(encs, sampling))
    check_only_the_faulty_one_failed(results, expected, "prefilling the prompt failed: RuntimeError: shape mismatch")
    assert engine.scheduler.rows == [] and bursts and bursts[0] == 2  # the first two arrived in one burst


@pytest.mark.parametrize("after", [0, 5])
def test_a_fault_while_sampling_one_row_fails_that_request_alone(requests_, monkeypatch, after):
    """At its first token (picked from the prefill) or in the middle of the batch's decoding."""
    engine, encs, sampling, expected = requests_
    draw, jobs = Row.draw, jobs_for(encs, sampling)

    def broken(row, noise):
        if row.job is jobs[FAULTY] and len(row.ids) - encs[FAULTY].num_tokens >= after:
            raise RuntimeError("probability tensor contains inf or nan (simulated)")
        return draw(row, noise)

    monkeypatch.setattr(Row, "draw", broken)
    results = outcomes(engine, jobs)
    check_only_the_faulty_one_failed(results, expected, "sampling the next token failed: RuntimeError: probability")
    assert results[FAULTY][0] == expected[FAULTY][:after]  # what it streamed before the fault was right


def test_a_stream_that_fails_ends_that_request_alone(requests_):
    engine, encs, sampling, expected = requests_
    taken = []

    def broken_sink(item):
        if isinstance(item, list):
            taken.append(item)
            if len(taken) == 3:
                raise ConnectionResetError("the client went away (simulated)")

    sinks = [None] * COUNT
    sinks[FAULTY] = broken_sink
    jobs = jobs_for(encs, sampling)
    results = outcomes(engine, jobs, sinks)
    for index in (0, 2, 3):
        assert results[index] == (expected[index], None)
    assert len(taken) == 3 and jobs[FAULTY].finished.is_set()  # no token after the failing one


def test_a_failing_decode_step_ends_its_rows_and_the_waiting_requests_go_on(requests_, monkeypatch):
    """A fault in the step shared by a batch cannot be pinned on one row: the rows of that step end with it,
    the requests waiting for a slot are served with their own tokens, and so is the next request."""
    engine, encs, sampling, expected = requests_
    decoder = engine.scheduler.decoder
    decode, calls = decoder.decode, []

    def broken(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return decode(*args)

    monkeypatch.setattr(decoder, "decode", broken)
    results = outcomes(engine, jobs_for(encs, sampling))
    # The first batch (two slots) arrived together at an idle server, so both were prefilled before the first step
    # (Scheduler._start_next): each had its prefill's token and two steps' when the third step failed.
    for index, tokens in ((0, 3), (1, 3)):
        assert "out of memory while decoding" in str(results[index][1])
        assert results[index][0] == expected[index][:tokens]
    for index in (2, 3):
        assert results[index] == (expected[index], None)


@pytest.mark.parametrize("stage", ["prefill", "decode", "encode"])
def test_an_error_that_leaves_the_device_unusable_ends_the_worker(requests_, monkeypatch, stage):
    engine, encs, sampling, expected = requests_
    decoder, exits = engine.scheduler.decoder, []
    fatal = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    def broken(*args):
        raise fatal

    monkeypatch.setattr(failures, "exit_worker", exits.append)  # the real one ends this process: tested below
    if stage == "encode":
        prepares = list(encs)
        prepares[FAULTY] = broken
        jobs = [Job(p, s) for p, s in zip(prepares, sampling)]
    else:
        monkeypatch.setattr(decoder, stage, broken)
        if stage == "prefill":  # a burst's prompts run together first
            monkeypatch.setattr(decoder, "prefill_together", broken)
        jobs = jobs_for(encs, sampling)
    outcomes(engine, jobs)
    assert exits and exits[0] is fatal


@pytest.mark.parametrize("error,lost", [
    (torch.AcceleratorError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA error: misaligned address"), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), False),
    (torch.AcceleratorError("CUDA error: out of memory"), False),  # not sticky: the next allocation may succeed
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("CUDA error in a message about something else"), False),
])
def test_which_errors_leave_the_device_unusable(error, lost):
    assert device_lost(error) is lost


WORKER = """
import sys, torch
from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Sampling
from idefics_cog.inputs.prompt import build_segments

engine = Engine.load(sys.argv[1], "cpu")
def broken(*args):
    raise torch.AcceleratorError("CUDA error: device-side assert triggered")
engine.scheduler.decoder.decode = broken
enc = engine.encode(build_segments("Hi", 0), [])
for piece in engine.stream(enc, Sampling(max_new_tokens=5)):
    pass
print("still serving")
"""


@pytest.mark.slow
def test_a_device_side_assert_ends_the_process_with_the_reason_logged(tiny_dir):
    """The real exit: the process ends at once with status 70 and says why (coglet then reports UNHEALTHY:
    test_predict_faults.py::test_a_worker_crash_and_a_setup_failure_show_in_the_health_check)."""
    done = subprocess.run([sys.executable, "-c", WORKER, str(tiny_dir / "base")], capture_output=True, text=True,
                          timeout=120, cwd=str(tiny_dir.parents[1]), env={**os.environ, "PYTHONPATH": "src"})
    assert done.returncode == failures.DEVICE_LOST_EXIT, done.stderr[-2000:]
    assert "still serving" not in done.stdout
    assert "the device is unusable after AcceleratorError: CUDA error: device-side assert" in done.stderr


@pytest.mark.slow
def test_a_fault_in_model_generate_fails_that_request_alone(tiny_dir, monkeypatch):
    """The transformers path (IDEFICS_ENGINE=transformers, and requests the fast path cannot hold): one request's
    `model.generate` fails, the requests queued behind it get their own tokens."""
    engine = Engine.load(tiny_dir / "base", "cpu", decode_path="transformers")
    encs = [encoded(engine, f"Question {i}?", [noise_image(i)]) for i in range(3)]
    sampling = [Sampling(max_new_tokens=10)] * 3
    expected = [generate(engine, enc, s) for enc, s in zip(encs, sampling)]
    original = engine.model.generate

    def broken(**kwargs):
        if torch.equal(kwargs["input_ids"], encs[FAULTY].input_ids):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (simulated)")
        return original(**kwargs)

    monkeypatch.setattr(engine.model, "generate", broken)
    results = outcomes(engine, jobs_for(encs, sampling))
    check_only_the_faulty_one_failed(results, expected, "out of memory while generating")


def test_a_failed_prefill_leaves_no_adapter_selected(tiny_dir, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraLayer

    from idefics_cog.serving.rowlora import active_adapter
    from idefics_cog.serving.adapters import Adapters

    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=2)
    adapters = Adapters(engine, tmp_path)
    adapters.load_default(str(tiny_dir / "adapter"))

    def broken(*args, **kwargs):
        raise RuntimeError("prefill fault (simulated)")

    monkeypatch.setattr(engine.scheduler.decoder, "prefill", broken)
    job = Job(encoded(engine, "Question?", [noise_image(1)]), Sampling(max_new_tokens=4),
              select_adapter=lambda: engine.run(adapters.select, "medical"))
    ((tokens, error),) = outcomes(engine, [job])
    assert tokens == [] and "prefilling the prompt failed: RuntimeError" in str(error)
    assert active_adapter(m for m in engine.model.modules() if isinstance(m, LoraLayer)) is None
