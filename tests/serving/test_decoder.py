"""The fast decode path and batching: the same tokens as `model.generate`, alone and in batches."""

import logging
import threading

import pytest
import torch

from idefics_cog.serving.adapters import Adapters
from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Job, Sampling
from idefics_cog.serving.decoder import FastDecoder
from tests.support.engine import CASES, encoded, generate, submit_together
from tests.support.helpers import noise_image


def run_together(engine, jobs: list[Job]) -> list[list[int]]:
    """`submit_together`, then each job's tokens (the first error any of them got is raised)."""
    received = submit_together(engine, jobs)
    for items in received:
        errors = [item for item in items if isinstance(item, BaseException)]
        if errors:
            raise errors[0]
    return [[token for item in items if isinstance(item, list) for token in item] for items in received]


@pytest.fixture(scope="module")
def with_adapter(tiny_dir, tmp_path_factory):
    engine = Engine.load(tiny_dir / "base", "cpu")
    adapters = Adapters(engine, tmp_path_factory.mktemp("cache"))
    adapters.load_default(str(tiny_dir / "adapter"))
    return engine, adapters


def test_the_default_engine_is_fast_and_transformers_can_be_chosen(engine, tiny_dir):
    assert engine.decode_path == "fast"
    assert Engine.load(tiny_dir / "base", "cpu", decode_path="transformers").decode_path == "transformers"


@pytest.mark.parametrize("case", CASES)
def test_prefill_logits_equal_the_model_forward(engine, case):
    text, images = CASES[case]
    enc = encoded(engine, text, images)
    decoder = FastDecoder(engine.model, max_batch=2, max_images=4)
    logits = decoder.prefill(engine.model, 1, enc)
    with torch.inference_mode():
        expected = engine.model(**enc.to(engine.device, engine.dtype)).logits[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_decode_logits_equal_the_model_forward_over_the_whole_sequence(engine, case):
    """After a prefill and some decode steps (cache, image keys/values kept from the prefill), the next-token
    logits equal those of one plain forward over the prompt and the tokens decoded so far."""
    text, images = CASES[case]
    enc = encoded(engine, text, images)
    decoder = FastDecoder(engine.model, max_batch=2, max_images=4)
    tokens = []
    with torch.inference_mode():
        logits = decoder.prefill(engine.model, 0, enc)
        for step in range(6):
            tokens.append(int(logits.argmax()))
            logits = decoder.decode(engine.model, [tokens[-1]], [enc.num_tokens + step]).logits
        inputs = enc.to(engine.device, engine.dtype)
        added = torch.tensor([tokens])
        mask = inputs["image_attention_mask"]  # a new token sees the images of the prompt's last token
        expected = engine.model(
            input_ids=torch.cat([inputs["input_ids"], added], 1),
            attention_mask=torch.ones(1, enc.num_tokens + len(tokens), dtype=torch.long),
            pixel_values=inputs["pixel_values"],
            image_attention_mask=torch.cat([mask, mask[:, -1:].expand(-1, len(tokens), -1)], 1),
        ).logits[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["none", "medical"])
@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_equal_generate(with_adapter, case, adapter):
    engine, adapters = with_adapter
    adapters.select(adapter)
    text, images = CASES[case]
    enc = encoded(engine, text, images)
    sampling = Sampling(max_new_tokens=40)
    "".join(engine.stream(enc, sampling))
    assert engine.last_stats.ids == generate(engine, enc, sampling)


@pytest.mark.slow
def test_a_batch_of_different_requests_gives_each_its_own_tokens(engine):
    """Different prompts, image counts, lengths and sampling settings, decoded as one batch: every request gets
    exactly the tokens `model.generate` gives it alone (sampled ones too: each has its own generator)."""
    requests = [
        ("What does this X-ray show?", [noise_image(1)], Sampling(max_new_tokens=30)),
        ("Compare <image> and <image>.", [noise_image(2), noise_image(3)], Sampling(max_new_tokens=45)),
        ("Tell me about lungs.", [], Sampling(max_new_tokens=12)),
        ("Describe it.", [noise_image(4)], Sampling(max_new_tokens=30, temperature=0.9, top_p=0.9, top_k=50,
                                                     seed=7)),
        ("Describe it.", [noise_image(4)], Sampling(max_new_tokens=30, repetition_penalty=1.3)),
        ("A long question about the picture " * 6, [noise_image(5)], Sampling(max_new_tokens=1)),
        ("Again.", [noise_image(6)], Sampling(max_new_tokens=25, ignore_eos=True)),
    ]
    encs = [encoded(engine, text, images) for text, images, _ in requests]
    expected = [generate(engine, enc, sampling) for enc, (_, _, sampling) in zip(encs, requests)]
    engine.scheduler.largest_batch = 0
    got = run_together(engine, [Job(enc, sampling) for enc, (_, _, sampling) in zip(encs, requests)])
    assert got == expected
    assert engine.scheduler.largest_batch == len(requests) - 1  # the 1-token request ends at its prefill


@pytest.mark.slow
def test_more_requests_than_slots_wait_for_a_free_slot(tiny_dir):
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=2)
    encs = [encoded(engine, f"Question {i}?", [noise_image(i)]) for i in range(5)]
    sampling = [Sampling(max_new_tokens=8 + 4 * i) for i in range(5)]
    expected = [generate(engine, enc, s) for enc, s in zip(encs, sampling)]
    assert run_together(engine, [Job(enc, s) for enc, s in zip(encs, sampling)]) == expected
    assert engine.scheduler.largest_batch == 2


@pytest.mark.slow
def test_adapters_share_a_batch_each_selected_before_its_prefill(with_adapter):
    engine, adapters = with_adapter
    enc = encoded(engine, *CASES["one image"])
    sampling = Sampling(max_new_tokens=20)
    alone = {}
    for name in ("medical", "none"):
        adapters.select(name)
        alone[name] = generate(engine, enc, sampling)
    assert alone["medical"] != alone["none"]
    selected = []

    def job(name):
        return Job(enc, sampling, adapter=name, select_adapter=lambda: selected.append(adapters.select(name)))

    order = ["medical", "medical", "none", "medical", "none"]
    engine.scheduler.largest_batch = 0
    got = run_together(engine, [job(name) for name in order])
    assert got == [alone[name] for name in order]
    assert selected == order  # each request's own adapter, selected for its prefill
    assert engine.scheduler.largest_batch == len(order)  # one batch: each row decodes with its own adapter


@pytest.mark.slow
def test_cancelling_one_request_leaves_the_others_unchanged(engine):
    encs = [encoded(engine, "Describe it.", [noise_image(i)]) for i in range(3)]
    sampling = Sampling(max_new_tokens=60, ignore_eos=True)
    expected = [generate(engine, enc, sampling) for enc in encs]
    jobs = [Job(enc, sampling) for enc in encs]
    received = []

    def cancel_after_five(items):
        received.append(items)
        if len(received) == 5:
            jobs[1].cancel()

    gate = threading.Event()
    engine.torch_thread.submit(gate.wait)
    outputs = [[], None, []]
    engine.submit(jobs[0], outputs[0].append)
    engine.submit(jobs[1], cancel_after_five)
    engine.submit(jobs[2], outputs[2].append)
    gate.set()
    for job in jobs:
        assert job.finished.wait(60)
    tokens = [[t for item in items if isinstance(item, list) for t in item] for items in (outputs[0], outputs[2])]
    assert tokens == [expected[0], expected[2]]
    assert 5 <= len([item for item in received if isinstance(item, list)]) <= 6


def test_stop_sequences_end_each_stream_on_its_own(engine):
    """Concurrent streams: one ends at its stop sequence, the other runs to its end."""
    enc = encoded(engine, *CASES["one image"])
    full = "".join(engine.stream(enc, Sampling(max_new_tokens=30)))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    answers = {}

    def consume(key, sampling):
        answers[key] = "".join(engine.stream(Job(enc, sampling)))

    threads = [threading.Thread(target=consume, args=("stopped", Sampling(max_new_tokens=30, stop_sequences=[stop]))),
               threading.Thread(target=consume, args=("full", Sampling(max_new_tokens=30)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers["full"] == full
    assert answers["stopped"] == full[:full.index(stop)] and len(answers["stopped"]) < len(full)


@pytest.mark.slow
def test_requests_the_fast_path_cannot_hold_fall_back_to_generate_logged_once(tiny_dir, caplog):
    engine = Engine.load(tiny_dir / "base", "cpu", max_images=1)
    enc = encoded(engine, *CASES["two images with placeholders"])
    sampling = Sampling(max_new_tokens=20)
    with caplog.at_level(logging.WARNING, logger="idefics_cog.serving.scheduler"):
        for _ in range(2):
            "".join(engine.stream(enc, sampling))
            assert engine.last_stats.ids == generate(engine, enc, sampling)
    assert len([r for r in caplog.records if "model.generate" in r.message]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_models_give_the_same_greedy_tokens(tiny_dir, tmp_path, quantization):
    import warnings

    engine = Engine.load(tiny_dir / "base", "cpu", quantization)
    Adapters(engine, tmp_path).load_default(str(tiny_dir / "adapter"))
    enc = encoded(engine, *CASES["one image"])
    sampling = Sampling(max_new_tokens=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes warns about casts on CPU at every matmul
        "".join(engine.stream(enc, sampling))
        assert engine.decode_path == "fast" and engine.last_stats.ids == generate(engine, enc, sampling)


@pytest.mark.slow
def test_an_out_of_memory_prefill_fails_that_request_alone(tiny_dir, monkeypatch):
    """An out-of-memory error in one request's prefill ends that request with a clear message; the requests
    around it (running and waiting: two slots for four) get their tokens unchanged, and its slot is reused."""
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=2)
    encs = [encoded(engine, f"Question {i}?", [noise_image(i)]) for i in range(4)]
    sampling = Sampling(max_new_tokens=10)
    expected = [generate(engine, enc, sampling) for enc in encs]
    prefill, together = engine.scheduler.decoder.prefill, engine.scheduler.decoder.prefill_together

    def out_of_memory_for_the_second(model, slot, enc):
        if enc is encs[1]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return prefill(model, slot, enc)

    def out_of_memory_with_the_second(model, slots, encodeds):  # a burst's forward: retried one by one
        if any(enc is encs[1] for enc in encodeds):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (simulated)")
        return together(model, slots, encodeds)

    monkeypatch.setattr(engine.scheduler.decoder, "prefill", out_of_memory_for_the_second)
    monkeypatch.setattr(engine.scheduler.decoder, "prefill_together", out_of_memory_with_the_second)
    with pytest.raises(RuntimeError, match="out of memory while prefilling the prompt.*other requests were not"):
        run_together(engine, [Job(encs[1], sampling)])
    received = submit_together(engine, [Job(enc, sampling) for enc in encs])
    assert isinstance(received[1][-1], RuntimeError) and len(received[1]) == 1
    for index in (0, 2, 3):
        assert [t for item in received[index] if isinstance(item, list) for t in item] == expected[index]
    assert engine.scheduler.rows == [] and engine.scheduler.largest_batch == 2
