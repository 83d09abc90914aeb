"""The scheduler: every request's torch work, on one thread, with concurrent requests decoded as one batch.

Fast path (`FastDecoder`): a request is prefilled alone into a free cache slot as soon as it arrives, then joins
the running batch; each decode step makes one token for every active request, which samples with its own
settings and generator and ends on its own (end of turn, max_new_tokens, a stop sequence, cancelation).
Requests for another adapter wait until the running batch has drained (first come, first served: a waiting
request also stops later ones for the running adapter from joining), so adapters never mix within a batch.
`transformers` path, and requests the fast path cannot take: `model.generate`, one request at a time.
"""

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from idefics_cog.fast import FastDecoder

log = logging.getLogger(__name__)

END = object()  # the last item a job's sink receives after a normal end


class Scheduler:
    def __init__(self, engine, kind: str, max_batch: int, max_images: int):
        self.engine = engine
        self.kind = "fast" if kind in ("auto", "fast") else "transformers"
        devices = set(getattr(engine.model, "hf_device_map", {}).values())
        if self.kind == "fast" and len(devices) > 1:
            log.warning("IDEFICS_ENGINE=%s: the model is spread over %d devices, which the fast path does not "
                        "support; decoding with model.generate", kind, len(devices))
            self.kind = "transformers"
        self.decoder = FastDecoder(engine.model, max_batch, max_images) if self.kind == "fast" else None
        self.waiting: deque = deque()
        self.starting: deque = deque()  # admitted, not yet started
        self.lock = threading.Lock()
        self.running = False  # a `_serve` loop is on the generation thread
        self.rows: list[_Row] = []  # the running batch; rows[i] lives in cache slot i
        self.adapter = None  # the adapter key of the running batch
        self.fallbacks_logged: set[str] = set()
        self.largest_batch = 0  # the most requests decoded together so far (for tests and benchmarks)

    def submit(self, job) -> None:
        with self.lock:
            self.waiting.append(job)
            if self.running:
                return
            self.running = True
        self.engine.generation_thread.submit(self._serve)

    def _serve(self) -> None:
        """Run until no request is active or waiting; a new submit starts it again."""
        try:
            with torch.inference_mode():
                while True:
                    with self.lock:
                        if not self.rows and not self.waiting:
                            self.running = False
                            return
                        self.starting.extend(self._admit())
                    while self.starting:
                        self._start(self.starting[0])
                        self.starting.popleft()
                    if self.rows:
                        self._step()
        except BaseException as exc:  # a bug or an out-of-memory: fail what is active, keep serving
            log.exception("decode loop failed")
            with self.lock:
                for job in [row.job for row in self.rows if not row.job.finished.is_set()] + [
                        job for job in self.starting if not job.finished.is_set()] + list(self.waiting):
                    _end(job, exc)
                self.rows.clear()
                self.starting.clear()
                self.waiting.clear()
                self.running = False

    def _admit(self) -> list:
        """Waiting jobs that may start now, in arrival order: with a running batch, those for its adapter up to
        the first that needs another; with none, the first job's adapter group."""
        for job in [job for job in self.waiting if job.cancelled.is_set()]:
            self.waiting.remove(job)
            _end(job)
        admitted = []
        if not self.rows and self.waiting:
            self.adapter = self.waiting[0].adapter
        room = self.decoder.max_batch - len(self.rows) if self.decoder else 1 - len(self.rows)
        while self.waiting and len(admitted) < room and self.waiting[0].adapter == self.adapter:
            admitted.append(self.waiting.popleft())
        return admitted

    def _start(self, job) -> None:
        """Select the job's adapter (at the start of a batch), encode it, and prefill it or run it alone."""
        if job.cancelled.is_set():
            return _end(job)
        engine = self.engine
        try:
            if job.select_adapter and not self.rows:
                job.context.run(job.select_adapter)
            encoded = job.context.run(job.prepare) if callable(job.prepare) else job.prepare
            job.stats.prompt_tokens = encoded.num_tokens
            max_new_tokens = engine.fit_to_context(encoded.num_tokens, job.sampling.max_new_tokens)
        except BaseException as exc:  # an input error (bad adapter, prompt too long) ends this job only
            return _end(job, exc)
        if self.decoder is None or not self.decoder.fits(encoded):
            if self.decoder is not None:
                job.context.run(self._log_fallback, f"{encoded.pixel_values.shape[1]} images do not fit a slot")
            return self._generate(job, encoded, max_new_tokens)
        row = _Row(job, encoded.input_ids[0].tolist(), max_new_tokens, engine, len(self.rows))
        self.rows.append(row)
        logits = self.decoder.prefill(engine.model, row.slot, encoded)
        self._emit([row], logits)

    def _step(self) -> None:
        rows = self.rows
        self._drop([i for i, row in enumerate(rows) if row.job.cancelled.is_set()])
        if rows:
            self.largest_batch = max(self.largest_batch, len(rows))
            logits = self.decoder.decode(self.engine.model, [row.ids[-1] for row in rows],
                                         [len(row.ids) - 1 for row in rows])
            self._emit(rows, logits)

    def _emit(self, rows: list, logits: torch.Tensor) -> None:
        """Pick each row's next token, hand it to its job, and drop the rows that are done."""
        logits[:, self.engine.banned_ids] = -float("inf")
        greedy = logits.argmax(-1).tolist()
        done = []
        for index, row in enumerate(rows):
            token = row.pick(logits[index:index + 1]) if row.processors else greedy[index]
            row.ids.append(token)
            row.job.sink([token])
            row.remaining -= 1
            if row.remaining == 0 or (token in self.engine.eos_token_ids and not row.job.sampling.ignore_eos):
                done.append(row.slot)
        self._drop(done)

    def _drop(self, slots: list[int]) -> None:
        """End the rows in `slots`; the last rows move into the freed slots, so slots 0..n-1 stay active."""
        for slot in sorted(slots, reverse=True):
            _end(self.rows[slot].job)
            last = self.rows.pop()
            if slot < len(self.rows):
                self.decoder.move(last.slot, slot)
                last.slot = slot
                self.rows[slot] = last

    def _generate(self, job, encoded, max_new_tokens: int) -> None:
        """The plain transformers recipe: `model.generate`, streaming through the job's sink."""
        engine = self.engine
        kwargs = engine.generate_kwargs(encoded, job.sampling, max_new_tokens)
        kwargs.update(streamer=NewTokens(job.sink), stopping_criteria=StoppingCriteriaList([_Cancelled(job)]))
        try:
            torch.manual_seed(job.stats.seed)  # sampling draws from the global generator in `generate`
            engine.model.generate(**kwargs)
        except BaseException as exc:
            return _end(job, exc)
        _end(job)

    def _log_fallback(self, reason: str) -> None:
        if reason not in self.fallbacks_logged:
            self.fallbacks_logged.add(reason)
            log.warning("fast path: %s; this request (and any like it) is decoded with model.generate", reason)


def _end(job, error: BaseException | None = None) -> None:
    job.sink(error if error is not None else END)
    job.finished.set()


@dataclass(eq=False)
class _Row:
    """A request in the running batch: its tokens so far, and how it picks the next one."""

    job: object
    ids: list[int]  # prompt and generated tokens (the repetition penalty looks at both, as in generate)
    remaining: int  # tokens still allowed
    engine: object
    slot: int
    processors: LogitsProcessorList = field(init=False)
    generator: torch.Generator | None = field(init=False, default=None)

    def __post_init__(self):
        # The same processors, in the same order, as `model.generate` builds for these settings.
        sampling = self.job.sampling
        self.processors = LogitsProcessorList()
        if sampling.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        if sampling.temperature > 0:
            self.processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                self.processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(sampling.top_p))
            # Its own generator: a request's samples depend on its seed only, never on its batch.
            self.generator = torch.Generator(self.engine.device).manual_seed(self.job.stats.seed)

    def pick(self, logits: torch.Tensor) -> int:
        history = torch.tensor([self.ids], device=logits.device)
        scores = self.processors(history, logits)
        if self.generator is None:
            return int(scores.argmax())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class NewTokens(BaseStreamer):
    """Hands `generate`'s new tokens (not the prompt it passes first) to `sink`, a list of ids per step."""

    def __init__(self, sink):
        self.sink, self.prompt_seen = sink, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.sink(value.flatten().tolist())
        self.prompt_seen = True

    def end(self) -> None:
        pass


class _Cancelled(StoppingCriteria):
    def __init__(self, job):
        self.job = job

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        stop = self.job.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
