"""Requests served by themselves on the torch thread, between two decode steps of the batch: `model.generate` (the
transformers path, and requests the fast path cannot hold) and `choices` scoring (the model as transformers defines
it). Each raises failures.failure's error, naming its stage."""

import torch
from transformers import StoppingCriteriaList

from idefics_cog.serving.failures import failure
from idefics_cog.serving.jobs import Cancelled, NewTokens
from idefics_cog.serving.scoring import candidate_logprobs, record_generated


def generate(engine, job, encoded, max_new_tokens: int, banned: torch.Tensor) -> None:
    kwargs = engine.generate_kwargs(encoded, job.sampling, max_new_tokens)
    kwargs.update(streamer=NewTokens(job.sink), stopping_criteria=StoppingCriteriaList([Cancelled(job)]))
    if job.logprobs:  # the raw scores of each step, before any logits processor
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    try:
        torch.manual_seed(job.stats.seed)  # `generate` draws from the global generator
        out = engine.model.generate(**kwargs)
    except Exception as exc:
        raise failure("generating", exc) from exc
    if job.logprobs and out.logits:
        try:
            record_generated(job, out.logits, out.sequences[0, -len(out.logits):].tolist(), banned)
        except Exception as exc:
            raise failure("reporting log-probabilities", exc) from exc


def score(engine, job, encoded, banned: torch.Tensor) -> None:
    try:
        job.scores = candidate_logprobs(engine.model, encoded, job.choices, banned, engine.device, engine.dtype)
    except Exception as exc:
        raise failure("scoring the choices", exc) from exc
