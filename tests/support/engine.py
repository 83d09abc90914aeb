"""Answers of the tiny engine: through the project (`run`), by the plain model-card recipe (`recipe`), by plain
`model.generate` (`generate`), on shared cases."""

import threading

import torch
from transformers import IdeficsForVisionText2Text

from idefics_cog.inputs.prompt import build_segments
from idefics_cog.serving.jobs import Sampling
from idefics_dev.recipe import model_card_generate
from idefics_dev.tiny import random_lora
from tests.support.helpers import noise_image

GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def run(engine, text, images=(), template="instruct", **sampling):
    segments = build_segments(text, len(images), template)
    return "".join(engine.stream(engine.encode(segments, list(images)), Sampling(**sampling)))


def recipe(engine, text, images=(), template="instruct", max_new_tokens=24, **sampling):
    segments = build_segments(text, len(images), template)
    items = [images[s] if isinstance(s, int) else s for s in segments]
    return model_card_generate(engine.model, engine.processor, items, max_new_tokens, **(sampling or GREEDY))


CASES = {
    "one image": ("What does this X-ray show?", [noise_image(1)]),
    "two images with placeholders": ("Compare <image> and <image>.", [noise_image(2), noise_image(3)]),
    "text only": ("Tell me about lungs.", []),
}


def encoded(engine, text, images=()):
    return engine.encode(build_segments(text, len(images)), list(images))


def generate(engine, enc, sampling: Sampling) -> list[int]:
    """The plain transformers recipe's tokens for this request (seeded like the engine)."""
    kwargs = engine.generate_kwargs(enc, sampling, sampling.max_new_tokens)
    with torch.inference_mode():
        torch.manual_seed(sampling.seed or 0)
        out = engine.model.generate(**kwargs)
    return out[0, enc.num_tokens:].tolist()


TEXT, IMAGES = CASES["one image"]


def answer(engine, **sampling):
    return run(engine, TEXT, IMAGES, max_new_tokens=16, **sampling)


def submit_together(engine, jobs, sinks=None, timeout: float = 120) -> list[list]:
    """Submit all jobs while the scheduler's thread is held, so that they arrive together; what each one's sink
    received (lists of token ids, then END or the exception that ended it). `sinks[i](items)`, when given, makes
    job i's sink from its list."""
    gate = threading.Event()
    engine.torch_thread.submit(gate.wait)
    received = [[] for _ in jobs]
    for index, (job, items) in enumerate(zip(jobs, received)):
        engine.submit(job, (sinks or {}).get(index, lambda items: items.append)(items))
    gate.set()
    for job in jobs:
        assert job.finished.wait(timeout), "a request never ended"
    return received


def submit_behind_a_stream(engine, jobs, timeout: float = 120) -> list[list]:
    """Submit jobs[0], and the others together once it streams past its first token, counted as a protected stream
    from then on (scheduler.burst_window = 1: their prompts run in pieces between its decode steps, not whole as a
    burst reaching an idle server); what each one's sink received."""
    window, engine.scheduler.burst_window = engine.scheduler.burst_window, 1
    first = jobs[0].sampling
    assert first.ignore_eos and first.max_new_tokens > 2, "the first request must stream past its second token"
    received = [[] for _ in jobs]

    def first_sink(item):
        received[0].append(item)
        if sum(isinstance(entry, list) for entry in received[0]) == 2:
            for job, items in zip(jobs[1:], received[1:]):
                engine.submit(job, items.append)

    engine.submit(jobs[0], first_sink)
    try:
        for job in jobs:
            assert job.finished.wait(timeout), "a request never ended"
    finally:
        engine.scheduler.burst_window = window
    return received


def tokens_of(items) -> list[int]:
    """The tokens a sink received (the error that ended it is raised)."""
    errors = [item for item in items if isinstance(item, BaseException)]
    if errors:
        raise errors[0]
    return [token for item in items if isinstance(item, list) for token in item]


def other_adapter(base, folder, seed: int):
    """A LoRA unlike the medical one: another rank and more target layers (o_proj and down_proj too)."""
    return random_lora(IdeficsForVisionText2Text.from_pretrained(base), folder, seed, r=8, alpha=24,
                       targets=("q_proj", "v_proj", "o_proj", "down_proj"))


def selecting(adapters, adapter, lora_weights, lora_scale):
    return lambda: adapters.select(adapter, lora_weights, lora_scale, allow_local=True)


def alone(engine, adapters, enc, sampling, choice) -> list[int]:
    """The request alone on the plain transformers path (`model.generate`) with its adapter selected."""
    selecting(adapters, *choice)()
    return generate(engine, enc, sampling)
