"""Log-probabilities of the model's distribution over the tokens the server can write (the image tokens excluded),
before any sampling setting: `choices` (each candidate answer scored whole) and `logprobs` (each generated token and
its likeliest alternatives)."""

import math

import torch

from idefics_cog.inputs.prompt import Encoded


@torch.inference_mode()
def candidate_logprobs(model, encoded: Encoded, candidates: list[list[int]], banned: torch.Tensor, device, dtype
                       ) -> list[list[float]]:
    """Each candidate's tokens' log-probabilities after the prompt. The prompt and its images are computed once
    (one forward, its KV cache kept); then one forward of all candidates, each row reading the prompt's cache: a
    candidate's tokens see the prompt and their own earlier tokens only (causal; the padding after a shorter
    candidate is never seen by its tokens). The model is called as transformers defines it: any adapter PEFT has
    selected, quantized weights and a model spread over devices are served alike."""
    inputs = encoded.to(device, dtype)
    prompt = model(**inputs, use_cache=True)
    first = _logprobs(prompt.logits[:, -1], banned)[0]  # (vocab,): every candidate's first token
    scores = [first[ids[:1]] for ids in candidates]
    longest = max(map(len, candidates))
    if longest > 1:
        count, length = len(candidates), encoded.num_tokens
        fed = torch.tensor([ids[:-1] + [0] * (longest - len(ids)) for ids in candidates], device=device)
        cache = prompt.past_key_values
        cache.batch_repeat_interleave(count)
        images = prompt.image_hidden_states.expand(count, *prompt.image_hidden_states.shape[1:])
        image_input = "perceiver_embeddings" if _base(model).config.use_resampler else "image_encoder_embeddings"
        # A new token sees the images its prompt's last token sees, as in model.generate.
        image_mask = inputs["image_attention_mask"][:, -1:].expand(count, longest - 1, -1)
        out = model(input_ids=fed, attention_mask=torch.ones(count, length + longest - 1, device=device),
                    position_ids=torch.arange(length, length + longest - 1, device=device)[None].expand(count, -1),
                    past_key_values=cache, image_attention_mask=image_mask, use_cache=True, **{image_input: images})
        following = _logprobs(out.logits, banned)  # (count, longest - 1, vocab)
        scores = [torch.cat([score, following[row, torch.arange(len(ids) - 1, device=device), ids[1:]]])
                  for row, (score, ids) in enumerate(zip(scores, candidates))]
    return [score.tolist() for score in scores]


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _logprobs(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """Float32 log-softmax with the banned ids at -inf (they are never written)."""
    return torch.log_softmax(logits.float().index_fill(-1, banned, -math.inf), dim=-1)


def choice_table(texts: list[str], logprobs: list[list[float]]) -> list[dict]:
    """Per candidate, in the order given: its probability among the candidates (the exponentials of the summed
    log-probabilities, normalised), summed and per-token mean log-probability, token count."""
    sums = [math.fsum(row) for row in logprobs]
    top = max(sums)
    weights = [math.exp(s - top) for s in sums]  # shifted: a sum of -1000 does not underflow them all
    total = math.fsum(weights)
    return [{"text": text, "probability": weight / total, "logprob": summed, "mean_logprob": summed / len(row),
             "tokens": len(row)} for text, row, summed, weight in zip(texts, logprobs, sums, weights)]


def best(table: list[dict]) -> str:
    """The most probable candidate (the first given on a tie)."""
    return max(table, key=lambda row: row["logprob"])["text"]


def record_logprobs(jobs: list, logits: torch.Tensor, tokens: list[int], banned: torch.Tensor) -> None:
    """Appends to each job's `token_logprobs` (row i of `logits`, raw scores, picked `tokens[i]` for `jobs[i]`) the
    picked token's log-probability and the job's `logprobs` likeliest tokens: {"id", "logprob", "top": [[id,
    logprob], ...]}; one copy to the host."""
    if not jobs:
        return
    logprobs = _logprobs(logits, banned)
    picked = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    values, ids = (part.tolist() for part in logprobs.topk(max(job.logprobs for job in jobs), dim=-1))
    for job, token, chosen, row_ids, row_values in zip(jobs, tokens, picked, ids, values):
        top = [list(pair) for pair in zip(row_ids[:job.logprobs], row_values[:job.logprobs])]
        job.token_logprobs.append({"id": token, "logprob": chosen, "top": top})
