"""The next token of every row of a decode step, picked at once on the device and copied to the host once.

`model.generate` applies, in this order, the repetition penalty, the temperature, top-k and top-p to the logits,
then takes the argmax (greedy) or draws from the softmax with `torch.multinomial`. `BatchSampler` does the same
arithmetic for all rows of a step together, each row with its own settings (rows without a setting are left out
of that operation), so that a row's processed scores are bit-identical to what transformers' processors give for
it alone (tests/serving/test_sampler.py checks that on random logits; on CUDA a division by a setting is a product
with its float32 reciprocal, as ATen divides a tensor by a Python number there). The draw is `torch.multinomial`'s,
with the noise drawn per sampled row from that request's own generator: a request's samples depend on its seed
only, never on its batch.
The repetition penalty reads, per slot, the factor of each token's score: the request's penalty for the tokens seen
so far (prompt and answer), 1 for the others (x * 1 and x / 1 are x exactly), instead of gathering the ids.
"""

import operator
from dataclasses import dataclass

import torch


@dataclass
class _Plan:
    """What the settings of a batch's rows ask for: which rows each operation takes (indices into the batch, or into
    its sampled rows for the warpers) and their settings as tensors. Made once per batch composition: kept while the
    same rows come in the same order, each in the slot it had (a move drops the plan)."""

    rows: list  # the rows it was made for (kept, so that a new batch is never mistaken for them)
    penalized: list[int]
    unstarted: list  # penalized rows whose prompt is still to be marked as seen
    slots: torch.Tensor  # the penalized rows' cache slots
    history: slice | torch.Tensor  # their rows of `factors`: a slice (a view, no copy) when the slots are consecutive
    penalty: torch.Tensor  # of the penalized rows
    sampled: list[int]
    temperature: torch.Tensor
    top_k: list[int]  # of the sampled rows
    k: int  # the largest k of those rows (at most the vocabulary)
    kth: torch.Tensor | None  # each row's k - 1 (a column), when their k differ
    top_p: list[int]  # of the sampled rows
    remove_at: torch.Tensor  # 1 - top_p
    noise: torch.Tensor  # (sampled rows, vocab): each step's draws
    noise_rows: tuple  # its rows (views)

    def fits(self, rows: list) -> bool:
        return len(rows) == len(self.rows) and all(map(operator.is_, rows, self.rows))


class BatchSampler:
    def __init__(self, max_batch: int, banned_ids: list[int], device: torch.device):
        self.max_batch, self.device = max_batch, device
        self.banned = torch.tensor(banned_ids, dtype=torch.long, device=device)
        self.banned_set = frozenset(banned_ids)  # the same ids, to look up on the host
        # transformers divides scores by a Python number (temperature, penalty): on CUDA, ATen computes that as a
        # product with its float32 reciprocal (div_true_kernel_cuda), on CPU as a division. The same here.
        self.divide = _times_reciprocal if device.type == "cuda" else torch.div
        # (slots, vocab): the factor of each token's score for the repetition penalty (the request's penalty once
        # the token is seen, else 1); sized at the first step (the logits' width)
        self.factors: torch.Tensor | None = None
        self.plan: _Plan | None = None
        self.tokens: torch.Tensor | None = None  # the last `pick`'s tokens, on the device

    def move(self, source: int, target: int) -> None:
        """Slot `source`'s request continues in slot `target` (as FastDecoder.move)."""
        self.plan = None  # it names the row's old slot
        if self.factors is not None:
            self.factors[target] = self.factors[source]

    def release(self) -> None:
        """Forget the last batch (its rows hold their requests) once no request is decoding."""
        self.plan = None

    def pick(self, rows: list, logits: torch.Tensor, greedy: torch.Tensor | None = None
             ) -> tuple[list[int | None], dict]:
        """The next token of each row (its slot's float32 logits are `logits[i]`, processed in place), and
        {slot: exception} for the rows whose own draw failed (their token is None); `self.tokens` holds them on the
        device. `greedy`: the logits' argmax with the banned ids left out, when the decode step took it. Rows need
        `slot`, `ids`, `sampling`, `started` and, sampled ones, `draw(noise)` (fills a row of noise from the row's
        own generator)."""
        scores = logits
        plan = self.plan = self.plan if self.plan and self.plan.fits(rows) else self._plan(rows, scores.shape[-1])
        if greedy is not None and not plan.sampled and not plan.penalized:
            self.tokens = greedy
            return greedy.tolist(), {}  # the step's one copy to the host
        if plan.sampled:  # the banned ids' probabilities must be 0
            self._ban(scores)
        if plan.penalized:
            self._start(plan, scores.shape[-1])
            scores = _apply(scores, plan.penalized, lambda sub: self._penalize(plan, sub))
        if not plan.sampled:
            return self._greedy(plan, scores), {}
        # The greedy rows' tokens, before the warpers change the sampled rows' scores in place (when some rows are
        # greedy, the warpers get a copy of the sampled rows).
        tokens = scores.argmax(-1) if len(plan.sampled) < len(rows) else None
        errors = {}
        probs = torch.softmax(self._warp(plan, _rows(scores, plan.sampled)), dim=-1)
        # torch.multinomial(probs, 1) is argmax(probs / q) with q ~ Exp(1) drawn from its generator (ATen's
        # algorithm for one sample): each row draws its own q, then one division and argmax for the batch.
        for index, row_noise in zip(plan.sampled, plan.noise_rows):
            try:
                rows[index].draw(row_noise)
            except Exception as exc:  # this request's draw alone
                errors[rows[index].slot] = exc
        drawn = torch.argmax(probs / plan.noise, dim=-1)
        if tokens is None:
            tokens = drawn
        else:
            tokens[plan.sampled] = drawn
        self._mark(plan, tokens)
        self.tokens = tokens
        picked = tokens.tolist()  # the step's one copy to the host
        # multinomial refuses nan probabilities. A row's are all nan or none (softmax divides the row by one sum),
        # and argmax takes the first nan: a nan row draws id 0, so only a draw of id 0 needs a look.
        if 0 in picked:
            for position, index in enumerate(plan.sampled):
                if picked[index] == 0 and probs[position, 0].isnan() and rows[index].slot not in errors:
                    errors[rows[index].slot] = RuntimeError("probability tensor contains nan (the model's scores "
                                                            "for this request's next token)")
        if not errors:
            return picked, errors
        return [None if row.slot in errors else token for row, token in zip(rows, picked)], errors

    def _greedy(self, plan: _Plan, scores: torch.Tensor) -> list[int]:
        """Every row's argmax, with the banned ids left out: an argmax that is not a banned id is also the argmax
        without them (the first of the largest scores), so the ban (an operation per step) runs only when one is
        picked. Greedy rows cannot fail."""
        tokens = scores.argmax(-1)
        picked = tokens.tolist()  # the step's one copy to the host
        if not self.banned_set.isdisjoint(picked):
            tokens = self._ban(scores).argmax(-1)
            picked = tokens.tolist()
        self._mark(plan, tokens)
        self.tokens = tokens
        return picked

    def _ban(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill_(1, self.banned, -float("inf"))

    def _mark(self, plan: _Plan, tokens: torch.Tensor) -> None:
        """The penalized rows have now seen their new token."""
        if plan.penalized:
            self.factors[plan.slots, _rows(tokens, plan.penalized)] = plan.penalty

    def _plan(self, rows: list, width: int) -> _Plan:
        penalized = [i for i, row in enumerate(rows) if row.sampling.repetition_penalty != 1.0]
        sampled = [i for i, row in enumerate(rows) if row.sampling.temperature > 0]
        warped = [rows[i].sampling for i in sampled]
        top_k = [i for i, s in enumerate(warped) if s.top_k]
        top_p = [i for i, s in enumerate(warped) if s.top_p < 1.0]
        k = [min(warped[i].top_k, width) for i in top_k]
        slots = [rows[i].slot for i in penalized]
        slot_ids = torch.tensor(slots, dtype=torch.long, device=self.device)
        noise = torch.empty(len(sampled), width, device=self.device)
        return _Plan(
            rows=list(rows), penalized=penalized, unstarted=[rows[i] for i in penalized if not rows[i].started],
            slots=slot_ids, history=slice(slots[0], slots[-1] + 1) if _consecutive(slots) else slot_ids,
            penalty=torch.tensor([rows[i].sampling.repetition_penalty for i in penalized], device=self.device),
            sampled=sampled, temperature=self._column([s.temperature for s in warped]),
            top_k=top_k, k=max(k, default=0),
            kth=torch.tensor(k, device=self.device)[:, None] - 1 if len(set(k)) > 1 else None,
            top_p=top_p, remove_at=self._column([1 - warped[i].top_p for i in top_p]),
            noise=noise, noise_rows=noise.unbind(0))

    def _start(self, plan: _Plan, width: int) -> None:
        """Mark the prompt tokens of the plan's penalized rows at their first token."""
        if self.factors is None:
            self.factors = torch.ones(self.max_batch, width, device=self.device)
        for row in plan.unstarted:
            self.factors[row.slot] = 1.0
            self.factors[row.slot, torch.tensor(row.ids, device=self.device)] = row.sampling.repetition_penalty
            row.started = True
        plan.unstarted = []

    def _penalize(self, plan: _Plan, sub: torch.Tensor) -> torch.Tensor:
        """RepetitionPenaltyLogitsProcessor: seen tokens' scores times the penalty if negative, else divided."""
        factors = self.factors[plan.history]
        return torch.where(sub < 0, sub * factors, self.divide(sub, factors))

    def _warp(self, plan: _Plan, scores: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k and top-p where a row asks for them (TemperatureLogitsWarper,
        TopKLogitsWarper, TopPLogitsWarper)."""
        scores = self.divide(scores, plan.temperature, out=scores)  # in place, as pick may
        if plan.top_k:
            scores = _apply(scores, plan.top_k, lambda sub: _top_k(sub, plan.k, plan.kth))
        if plan.top_p:
            scores = _apply(scores, plan.top_p, lambda sub: _top_p(sub, plan.remove_at))
        return scores

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]


def _apply(scores: torch.Tensor, indices: list[int], operation) -> torch.Tensor:
    """`operation` on the rows `indices` of `scores` (on all of it when that is every row: no copies)."""
    if len(indices) == scores.shape[0]:
        return operation(scores)
    scores[indices] = operation(scores[indices])
    return scores


def _times_reciprocal(scores: torch.Tensor, divisors: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """scores / divisors as CUDA computes a tensor divided by a Python number: times its float32 reciprocal."""
    return torch.mul(scores, divisors.reciprocal(), out=out)


def _consecutive(numbers: list[int]) -> bool:
    return bool(numbers) and numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def _rows(scores: torch.Tensor, indices: list[int]) -> torch.Tensor:
    return scores if len(indices) == scores.shape[0] else scores[indices]


def _top_k(scores: torch.Tensor, k: int, kth: torch.Tensor | None) -> torch.Tensor:
    """TopKLogitsWarper with each row's own k (`kth`: k - 1 per row, None when all rows have `k`): below its k-th
    largest score, a row's scores are removed."""
    values = torch.topk(scores, k).values
    threshold = values[:, -1:] if kth is None else values.gather(1, kth)
    return scores.masked_fill_(scores < threshold, -float("inf"))  # the warped scores are the sampler's own


def _top_p(scores: torch.Tensor, remove_at: torch.Tensor) -> torch.Tensor:
    """TopPLogitsWarper with each row's own 1 - top_p (`remove_at`, a column): the least likely tokens whose
    probabilities add up to at most that are removed, the most likely one always kept."""
    ordered, order = torch.sort(scores, descending=False)
    remove = ordered.softmax(dim=-1).cumsum(dim=-1) <= remove_at
    remove[..., -1:] = False
    return scores.masked_fill_(remove.scatter(1, order, remove), -float("inf"))
