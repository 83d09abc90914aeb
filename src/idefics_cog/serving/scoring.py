"""Log-probabilities of the model's distribution over the tokens the server can write (the image tokens excluded),
before any sampling setting: `choices` (each candidate answer scored whole) and `logprobs` (each generated token and
its likeliest alternatives)."""

import math

import torch

from idefics_cog.inputs.prompt import Encoded
from idefics_cog.serving.decoder import unwrap
from idefics_cog.serving.failures import failure


@torch.inference_mode()
def candidate_logprobs(model, encoded: Encoded, candidates: list[list[int]], banned: torch.Tensor, device, dtype
                       ) -> list[list[float]]:
    """Each candidate's tokens' log-probabilities after the prompt. The prompt and its images are computed once (one
    forward, its KV cache kept); then one forward of all candidates packed in one sequence after it, each seeing the
    prompt and its own earlier tokens only (a block-diagonal causal mask, positions restarting after the prompt), so
    the cache is never copied. The model is called as transformers defines it: any adapter PEFT has selected,
    quantized weights and a model spread over devices are served alike."""
    inputs = encoded.to(device, dtype)
    prompt = model(**inputs, use_cache=True, logits_to_keep=1)  # the last position's logits only
    scores, normalizer = _scores(prompt.logits[0], banned)
    first = scores[-1] - normalizer[-1]  # (vocab,): every candidate's first token
    # Every candidate has at least two tokens (its text, then <end_of_utterance>): each feeds all but its last.
    lengths = torch.tensor([len(ids) - 1 for ids in candidates], device=device)
    length, total = encoded.num_tokens, int(lengths.sum())
    starts = torch.cumsum(lengths, 0) - lengths
    owner = torch.repeat_interleave(torch.arange(len(candidates), device=device), lengths)  # each token's candidate
    index = torch.arange(total, device=device)
    seen = torch.cat([torch.ones(total, length, dtype=torch.bool, device=device),
                      (owner[:, None] == owner[None]) & (index[None] <= index[:, None])], 1)
    mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, torch.finfo(dtype).min)
    image_input = "perceiver_embeddings" if unwrap(model).config.use_resampler else "image_encoder_embeddings"
    out = model(input_ids=torch.tensor([[t for ids in candidates for t in ids[:-1]]], device=device),
                attention_mask=mask[None, None], position_ids=(length + index - starts[owner])[None],
                past_key_values=prompt.past_key_values, use_cache=True,
                # A new token sees the images its prompt's last token sees, as in model.generate.
                image_attention_mask=inputs["image_attention_mask"][:, -1:].expand(1, total, -1),
                **{image_input: prompt.image_hidden_states})
    scores, normalizer = _scores(out.logits[0], banned)  # row starts[c] + j predicts token j + 1 of candidate c
    rows = []
    for start, ids in zip(starts.tolist(), candidates):
        at = start + torch.arange(len(ids) - 1, device=device)
        rows.append(torch.cat([first[ids[:1]], scores[at, ids[1:]] - normalizer[at, 0]]))
    return [row.tolist() for row in rows]


def _scores(logits: torch.Tensor, banned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scores with the banned ids at -inf (they are never written), and each row's log of the sum of their
    exponentials: a log-probability is a score less its row's normalizer (one copy of the logits, not three)."""
    scores = logits.float().index_fill(-1, banned, -math.inf)
    return scores, scores.logsumexp(-1, keepdim=True)


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


STEPS_PER_COPY = 256  # a generation's steps reported together: bounds the float32 copy of their logits


def record_logprobs(jobs: list, logits: torch.Tensor, tokens: list[int], banned: torch.Tensor) -> None:
    """Appends to each job's `token_logprobs` (row i of `logits`, raw scores, picked `tokens[i]` for `jobs[i]`) the
    picked token's log-probability and the job's `logprobs` likeliest tokens: {"id", "logprob", "top": [[id,
    logprob], ...]}; one copy to the host."""
    if not jobs:
        return
    scores, normalizer = _scores(logits, banned)
    picked = (scores.gather(1, torch.tensor(tokens, device=logits.device)[:, None]) - normalizer)[:, 0].tolist()
    values, ids = scores.topk(max(job.logprobs for job in jobs), dim=-1)
    values, ids = (values - normalizer).tolist(), ids.tolist()
    for job, token, chosen, row_ids, row_values in zip(jobs, tokens, picked, ids, values):
        top = [list(pair) for pair in zip(row_ids[:job.logprobs], row_values[:job.logprobs])]
        job.token_logprobs.append({"id": token, "logprob": chosen, "top": top})


def record_rows(rows: list, asking: list[int], logits: torch.Tensor, tokens: list, banned: torch.Tensor) -> dict:
    """`record_logprobs` for a decode step: rows[asking[j]] has row j of `logits`; rows without a token are skipped.
    Returns {slot: error} for the rows it failed for (those rows alone)."""
    kept = [j for j, i in enumerate(asking) if tokens[i] is not None]
    try:
        record_logprobs([rows[asking[j]].job for j in kept], logits[kept], [tokens[asking[j]] for j in kept], banned)
    except Exception as exc:
        return {rows[asking[j]].slot: failure("reporting log-probabilities", exc) for j in kept}
    return {}


def record_generated(job, step_logits: tuple[torch.Tensor, ...], tokens: list[int], banned: torch.Tensor) -> None:
    """`record_logprobs` for `model.generate`'s steps (`output_logits`), a few hundred at a time."""
    for start in range(0, len(step_logits), STEPS_PER_COPY):
        chunk = step_logits[start:start + STEPS_PER_COPY]
        record_logprobs([job] * len(chunk), torch.cat(chunk), tokens[start:start + len(chunk)], banned)
