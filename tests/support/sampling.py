"""Batched sampling's reference: what transformers' own processors and `torch.multinomial` give a row alone
(tests/serving/test_sampler.py; bench/gpu_facts.py runs the same comparison on CUDA)."""

import types

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from idefics_cog.serving.jobs import Job, Sampling
from idefics_cog.serving.sampler import BatchSampler
from idefics_cog.serving.jobs import Row

BANNED = [5, 9]
SETTINGS = [
    Sampling(),  # greedy
    Sampling(repetition_penalty=1.3),  # greedy with a penalty
    Sampling(temperature=0.7, seed=1),
    Sampling(temperature=0.9, top_k=20, seed=2),
    Sampling(temperature=1.3, top_p=0.8, seed=3),
    Sampling(temperature=0.6, top_p=0.95, top_k=50, repetition_penalty=1.1, seed=4),
    Sampling(temperature=0.8, top_p=0.5, top_k=3, repetition_penalty=0.7, seed=5),
    Sampling(temperature=0.33, top_k=1, seed=6),
]


def engine_on(device: str):
    """What a scheduler row reads of its engine."""
    return types.SimpleNamespace(device=torch.device(device))


ENGINE = engine_on("cpu")


def reference_pick(sampling: Sampling, ids: list[int], logits: torch.Tensor, generator) -> int:
    """Today's per-row recipe: the processors `model.generate` builds for these settings, on this row alone."""
    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.temperature > 0:
        processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
    logits = logits.clone()
    logits[:, BANNED] = -float("inf")
    scores = processors(torch.tensor([ids], device=logits.device), logits)
    if sampling.temperature == 0:
        return int(scores.argmax())
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


def batched_against_alone(device: str, vocab: int, steps: int = 40) -> list[str]:
    """Every row of SETTINGS picked in one batch, step after step, against each row alone through the reference
    (its own generator, the same seed): the steps where they differ (none is the answer)."""
    torch.manual_seed(0)
    rows = [Row(Job(None, s), list(torch.randint(0, vocab, (12,)).tolist()), 99, engine_on(device), slot)
            for slot, s in enumerate(SETTINGS)]
    references = [torch.Generator(device).manual_seed(row.job.stats.seed) for row in rows]
    sampler = BatchSampler(len(rows), BANNED, torch.device(device))
    differences = []
    for step in range(steps):
        logits = torch.randn(len(rows), vocab, device=device) * 4
        expected = [reference_pick(row.sampling, row.ids, logits[i:i + 1], references[i])
                    for i, row in enumerate(rows)]
        tokens, errors = sampler.pick(rows, logits.clone())
        if errors or tokens != expected:
            differences.append(f"step {step}: {tokens} {errors or ''} against {expected}")
        for row, token in zip(rows, expected):
            row.ids.append(token)
    return differences
