"""The next token of every row of a decode step, picked at once on the device and copied to the host once.

`model.generate` applies, in this order, the repetition penalty, the temperature, top-k and top-p to the logits,
then takes the argmax (greedy) or draws from the softmax with `torch.multinomial`. `BatchSampler` does the same
arithmetic for all rows of a step together, each row with its own settings (rows without a setting are left out
of that operation), so that a row's processed scores are bit-identical to what transformers' processors give for
it alone (tests/serving/test_sampler.py checks that on random logits). The draw is `torch.multinomial`'s, with the
noise drawn per sampled row from that request's own generator: a request's samples depend on its seed only, never
on its batch.
The repetition penalty reads a per-slot mask of the tokens seen so far (prompt and answer) instead of the ids.
"""

from dataclasses import dataclass

import torch


@dataclass
class _Plan:
    """What the settings of a batch's rows ask for: which rows each operation takes (indices into the batch, or into
    its sampled rows for the warpers) and their settings as columns. Made once per batch composition."""

    rows: list  # the rows it was made for (kept, so that a new batch is never mistaken for them)
    where: list[int]  # and their slots then (a row moved to a freed slot reads its history there)
    penalized: list[int]
    slots: torch.Tensor  # the penalized rows' cache slots
    penalty: torch.Tensor
    sampled: list[int]
    temperature: torch.Tensor
    top_k: list[int]  # of the sampled rows
    k: list[int]
    top_p: list[int]  # of the sampled rows
    remove_at: torch.Tensor  # 1 - top_p

    def fits(self, rows: list) -> bool:
        return (len(rows) == len(self.rows) and all(a is b for a, b in zip(rows, self.rows))
                and [row.slot for row in rows] == self.where)


class BatchSampler:
    def __init__(self, max_batch: int, banned_ids: list[int], device: torch.device):
        self.max_batch, self.device = max_batch, device
        self.banned = torch.tensor(banned_ids, dtype=torch.long, device=device)
        self.seen: torch.Tensor | None = None  # (slots, vocab) bool; sized at the first step (the logits' width)
        self.plan: _Plan | None = None

    def move(self, source: int, target: int) -> None:
        """Slot `source`'s request continues in slot `target` (as FastDecoder.move)."""
        if self.seen is not None:
            self.seen[target] = self.seen[source]

    def release(self) -> None:
        """Forget the last batch (its rows hold their requests) once no request is decoding."""
        self.plan = None

    def pick(self, rows: list, logits: torch.Tensor) -> tuple[list[int | None], dict]:
        """The next token of each row (its slot's logits are `logits[i]`), and {slot: exception} for the rows whose
        own draw failed (their token is None). Rows need `slot`, `ids`, `sampling`, `started` and, sampled ones,
        `draw(noise)` (fills a row of noise from the row's own generator)."""
        plan = self.plan = self.plan if self.plan and self.plan.fits(rows) else self._plan(rows)
        scores = logits.float()  # the decoder's float32 logits, processed in place
        scores.index_fill_(1, self.banned, -float("inf"))
        if plan.penalized:
            self._start([rows[i] for i in plan.penalized], scores.shape[-1])
            scores = _apply(scores, plan.penalized, lambda sub: self._penalize(plan, sub))
        tokens = scores.argmax(-1) if len(plan.sampled) < len(rows) else None  # the greedy rows'
        errors = {}
        if plan.sampled:
            probs = torch.softmax(self._warp(plan, _rows(scores, plan.sampled)), dim=-1)
            # torch.multinomial(probs, 1) is argmax(probs / q) with q ~ Exp(1) drawn from its generator (ATen's
            # algorithm for one sample): each row draws its own q, then one division and argmax for the batch.
            # Its checks become one: a row with nan probabilities gets -1 and fails alone.
            noise = torch.empty_like(probs)
            for index, row_noise in zip(plan.sampled, noise):
                try:
                    rows[index].draw(row_noise)
                except Exception as exc:  # this request's draw alone
                    errors[rows[index].slot] = exc
            drawn = torch.where(probs.isnan().any(dim=-1), -1, torch.argmax(probs / noise, dim=-1))
            if tokens is None:
                tokens = drawn
            else:
                tokens[plan.sampled] = drawn
        if plan.penalized:
            marked = tokens.clamp(min=0)  # a failed row's -1 marks nothing of use
            self.seen[plan.slots, _rows(marked, plan.penalized)] = True
        picked = tokens.tolist()  # the step's one copy to the host
        if not plan.sampled:  # greedy rows cannot fail here
            return picked, errors
        for row, token in zip(rows, picked):
            if token < 0 and row.slot not in errors:
                errors[row.slot] = RuntimeError("probability tensor contains nan (the model's scores for this "
                                                "request's next token)")
        return [None if row.slot in errors else token for row, token in zip(rows, picked)], errors

    def _plan(self, rows: list) -> _Plan:
        penalized = [i for i, row in enumerate(rows) if row.sampling.repetition_penalty != 1.0]
        sampled = [i for i, row in enumerate(rows) if row.sampling.temperature > 0]
        warped = [rows[i].sampling for i in sampled]
        top_k = [i for i, s in enumerate(warped) if s.top_k]
        top_p = [i for i, s in enumerate(warped) if s.top_p < 1.0]
        return _Plan(
            rows=list(rows), where=[row.slot for row in rows], penalized=penalized,
            slots=torch.tensor([rows[i].slot for i in penalized], device=self.device),
            penalty=self._column([rows[i].sampling.repetition_penalty for i in penalized]),
            sampled=sampled, temperature=self._column([s.temperature for s in warped]),
            top_k=top_k, k=[warped[i].top_k for i in top_k],
            top_p=top_p, remove_at=self._column([1 - warped[i].top_p for i in top_p]))

    def _start(self, rows: list, width: int) -> None:
        """Mark the prompt tokens of rows at their first token."""
        if self.seen is None:
            self.seen = torch.zeros(self.max_batch, width, dtype=torch.bool, device=self.device)
        for row in rows:
            if not row.started:
                self.seen[row.slot] = False
                self.seen[row.slot, torch.tensor(row.ids, device=self.device)] = True
                row.started = True

    def _penalize(self, plan: _Plan, sub: torch.Tensor) -> torch.Tensor:
        """RepetitionPenaltyLogitsProcessor: seen tokens' scores times the penalty if negative, else divided."""
        penalty = plan.penalty
        return torch.where(self.seen[plan.slots], torch.where(sub < 0, sub * penalty, sub / penalty), sub)

    def _warp(self, plan: _Plan, scores: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k and top-p where a row asks for them (TemperatureLogitsWarper,
        TopKLogitsWarper, TopPLogitsWarper)."""
        scores = scores / plan.temperature
        if plan.top_k:
            k = [min(k, scores.shape[-1]) for k in plan.k]
            scores = _apply(scores, plan.top_k, lambda sub: _top_k(sub, k))
        if plan.top_p:
            scores = _apply(scores, plan.top_p, lambda sub: _top_p(sub, plan.remove_at))
        return scores

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]


def _apply(scores: torch.Tensor, indices: list[int], operation) -> torch.Tensor:
    """`operation` on the rows `indices` of `scores` (on all of it when that is every row: no copies)."""
    if len(indices) == len(scores):
        return operation(scores)
    scores[indices] = operation(scores[indices])
    return scores


def _rows(scores: torch.Tensor, indices: list[int]) -> torch.Tensor:
    return scores if len(indices) == len(scores) else scores[indices]


def _top_k(scores: torch.Tensor, k: list[int]) -> torch.Tensor:
    """TopKLogitsWarper with each row's own k: below its k-th largest score, a row's scores are removed."""
    values = torch.topk(scores, max(k)).values
    kth = values[:, -1:] if min(k) == max(k) else values.gather(1, torch.tensor(k, device=scores.device)[:, None] - 1)
    return scores.masked_fill_(scores < kth, -float("inf"))  # the warped scores are the sampler's own


def _top_p(scores: torch.Tensor, remove_at: torch.Tensor) -> torch.Tensor:
    """TopPLogitsWarper with each row's own 1 - top_p (`remove_at`, a column): the least likely tokens whose
    probabilities add up to at most that are removed, the most likely one always kept."""
    ordered, order = torch.sort(scores, descending=False)
    remove = ordered.softmax(dim=-1).cumsum(dim=-1) <= remove_at
    remove[..., -1:] = False
    return scores.masked_fill_(remove.scatter(1, order, remove), -float("inf"))
