"""The next token of every row of a decode step, picked on the device for the whole batch, each row with its own
settings and generator, bit-identical to what `model.generate`'s logits processors give for that row alone."""

import operator
from dataclasses import dataclass

import torch


@dataclass
class _Plan:
    """Which rows each operation takes and their settings as tensors; kept while the batch's rows stay the same."""

    rows: list  # kept, so that a new batch is never mistaken for them
    penalized: list[int]
    unstarted: list  # penalized rows whose prompt is still to be marked as seen
    slots: torch.Tensor  # the penalized rows' slots
    history: slice | torch.Tensor  # their rows of `factors`: a slice (no copy) when the slots are consecutive
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
        self.banned_set = frozenset(banned_ids)
        # ATen (div_true_kernel_cuda) divides by a Python number as a product with its float32 reciprocal on CUDA.
        self.divide = _times_reciprocal if device.type == "cuda" else torch.div
        # (slots, vocab): each score's repetition penalty factor, 1 for unseen tokens (x * 1 and x / 1 are exact)
        self.factors: torch.Tensor | None = None
        self.plan: _Plan | None = None
        self.tokens: torch.Tensor | None = None  # the last `pick`'s tokens, on the device

    def move(self, source: int, target: int) -> None:
        self.plan = None  # it names the row's old slot
        if self.factors is not None:
            self.factors[target] = self.factors[source]

    def release(self) -> None:
        """Forget the last batch (its rows hold their requests)."""
        self.plan = None

    def pick(self, rows: list, logits: torch.Tensor, greedy: torch.Tensor | None = None
             ) -> tuple[list[int | None], dict]:
        """Each row's next token (None where its own draw failed) and {slot: exception}; `logits` are processed in
        place. `greedy`: the decode step's argmax without the banned ids."""
        scores = logits
        plan = self.plan = self.plan if self.plan and self.plan.fits(rows) else self._plan(rows, scores.shape[-1])
        if greedy is not None and not plan.sampled and not plan.penalized:
            self.tokens = greedy
            return greedy.tolist(), {}  # the step's one copy to the host
        if plan.sampled:
            self._ban(scores)
        if plan.penalized:
            self._start(plan, scores.shape[-1])
            scores = _apply(scores, plan.penalized, lambda sub: self._penalize(plan, sub))
        if not plan.sampled:
            return self._greedy(plan, scores), {}
        # The greedy rows' tokens, before the warpers change the scores in place.
        tokens = scores.argmax(-1) if len(plan.sampled) < len(rows) else None
        errors = {}
        probs = torch.softmax(self._warp(plan, _rows(scores, plan.sampled)), dim=-1)
        # torch.multinomial(probs, 1) is argmax(probs / q), q ~ Exp(1) from its generator (ATen, one sample).
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
        # multinomial refuses nan probabilities; a nan row (all nan) draws id 0, so only id 0 needs a look.
        if 0 in picked:
            for position, index in enumerate(plan.sampled):
                if picked[index] == 0 and probs[position, 0].isnan() and rows[index].slot not in errors:
                    errors[rows[index].slot] = RuntimeError("probability tensor contains nan (the model's scores "
                                                            "for this request's next token)")
        if not errors:
            return picked, errors
        return [None if row.slot in errors else token for row, token in zip(rows, picked)], errors

    def _greedy(self, plan: _Plan, scores: torch.Tensor) -> list[int]:
        """The ban runs only when a banned id is picked: any other argmax is also the argmax without them."""
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
        """The prompt tokens of new penalized rows count as seen."""
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
        """TemperatureLogitsWarper, then TopK and TopP where a row asks for them."""
        scores = self.divide(scores, plan.temperature, out=scores)  # in place, as pick may
        if plan.top_k:
            scores = _apply(scores, plan.top_k, lambda sub: _top_k(sub, plan.k, plan.kth))
        if plan.top_p:
            scores = _apply(scores, plan.top_p, lambda sub: _top_p(sub, plan.remove_at))
        return scores

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]


def _apply(scores: torch.Tensor, indices: list[int], operation) -> torch.Tensor:
    """On all of `scores`, without copies, when `indices` are every row."""
    if len(indices) == scores.shape[0]:
        return operation(scores)
    scores[indices] = operation(scores[indices])
    return scores


def _times_reciprocal(scores: torch.Tensor, divisors: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mul(scores, divisors.reciprocal(), out=out)


def _consecutive(numbers: list[int]) -> bool:
    return bool(numbers) and numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def _rows(scores: torch.Tensor, indices: list[int]) -> torch.Tensor:
    return scores if len(indices) == scores.shape[0] else scores[indices]


def _top_k(scores: torch.Tensor, k: int, kth: torch.Tensor | None) -> torch.Tensor:
    """TopKLogitsWarper with each row's own k (`kth`: k - 1 per row, None when all rows have `k`)."""
    values = torch.topk(scores, k).values
    threshold = values[:, -1:] if kth is None else values.gather(1, kth)
    return scores.masked_fill_(scores < threshold, -float("inf"))


def _top_p(scores: torch.Tensor, remove_at: torch.Tensor) -> torch.Tensor:
    """TopPLogitsWarper with each row's own 1 - top_p (`remove_at`, a column)."""
    ordered, order = torch.sort(scores, descending=False)
    remove = ordered.softmax(dim=-1).cumsum(dim=-1) <= remove_at
    remove[..., -1:] = False
    return scores.masked_fill_(remove.scatter(1, order, remove), -float("inf"))
