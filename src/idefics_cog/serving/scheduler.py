"""The scheduler: every request's torch work, on one thread, with concurrent requests decoded as one batch.

Fast path (`FastDecoder`): a request is prefilled alone into a free cache slot, at most one piece of prefill work
between two decode steps (a short prompt, or the images or `prefill_chunk` tokens of a longer one), so that new
requests never freeze running streams (a burst reaching an idle server is prefilled whole first: no stream runs
yet); then it joins the running batch. Requests with different adapters and
scales share a batch: a request's adapter is selected before its prefill, and its slot keeps that adapter for its
decode steps (decoder.py, rowlora.py); only decode steps, which read each row's adapter from its slot, run between
the pieces of one prompt. Each decode step makes one token for every active request; `BatchSampler` picks them for
the whole batch at once, each request with its own settings and generator, and each ends on its own (end of turn,
max_new_tokens, a stop sequence, cancelation).
`transformers` path, and requests the fast path cannot take: `model.generate`, one request at a time, each with its
own adapter selected.

Isolation: an error while admitting, encoding, selecting the adapter of, prefilling, sampling or streaming one
request ends that request alone (an out-of-memory error too, and its slot is freed); the others go on with
unchanged tokens. An error in the shared decode step ends the rows of that step, never the waiting requests. An
error that leaves the device unusable (a CUDA device-side assert, an illegal memory access) ends the worker
process, so that Cog reports it unhealthy instead of failing every later request.
"""

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from idefics_cog.serving.decoder import FastDecoder
from idefics_cog.serving.failures import explained, failure
from idefics_cog.serving.sampler import BatchSampler

log = logging.getLogger(__name__)

END = object()  # the last item a job's sink receives after a normal end
# Prompt tokens prefilled between two decode steps (a longer prompt runs in pieces): about one decode step's time.
# A GPU prefills hundreds of tokens in the time of one memory-bound decode step; a CPU far fewer (BENCHMARKS.md:
# on bench-small, pieces of 64 tokens already let the running streams' 99th percentile gap reach 3x their median).
PREFILL_CHUNK = {"cuda": 256}
PREFILL_CHUNK_OTHER = 32


class Scheduler:
    def __init__(self, engine, kind: str, max_batch: int, max_images: int):
        self.engine = engine
        self.kind = "fast" if kind in ("auto", "fast") else "transformers"
        devices = set(getattr(engine.model, "hf_device_map", {}).values())
        if self.kind == "fast" and len(devices) > 1:
            log.warning("IDEFICS_ENGINE=%s: the model is spread over %d devices, which the fast path does not "
                        "support; decoding with model.generate", kind, len(devices))
            self.kind = "transformers"
        self.decoder = (FastDecoder.sized(engine.model, max_batch, max_images, engine.cache_fraction)
                        if self.kind == "fast" else None)
        self.sampler = (BatchSampler(self.decoder.max_batch, engine.banned_ids, engine.device) if self.decoder
                        else None)
        self.waiting: deque = deque()
        self.starting: deque = deque()  # admitted, not yet started
        self.lock = threading.Lock()
        self.running = False  # a `_serve` loop is on the generation thread
        self.rows: list[_Row] = []  # the running batch; rows[i] lives in cache slot i
        self.prefill_chunk = PREFILL_CHUNK.get(engine.device.type, PREFILL_CHUNK_OTHER)
        self.prefilling: _Prefill | None = None  # a long prompt being prefilled piece by piece (starting[0]'s)
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
        """Run until no request is active or waiting; a new submit starts it again. Each stage handles its own
        errors; the catch-all below is for a bug in the loop itself: it ends the active requests only."""
        with torch.inference_mode():
            while True:
                try:
                    with self.lock:
                        if not self.rows and not self.waiting and not self.starting:
                            self.running = False
                            if self.sampler:
                                self.sampler.release()
                            return
                        if not self.starting:  # _admit counts the free slots as if nothing were starting
                            self.starting.extend(self._admit())
                    self._start_next()
                    if self.rows:
                        self._step()
                except BaseException as exc:
                    log.exception("decode loop failed")
                    with self.lock:
                        if not self.rows and not self.starting and self.waiting:
                            self.starting.append(self.waiting.popleft())  # so that a repeating error moves on
                    self._fail_active(failure("decoding", exc) if isinstance(exc, Exception) else exc)

    def _start_next(self) -> None:
        """One piece of prefill work between two decode steps, so that a burst of new requests delays the running
        streams by a bounded amount per token instead of all their prompts at once: start admitted jobs up to and
        including the first that runs its prompt (a prefill of up to `prefill_chunk` tokens, or model.generate), or
        the next piece of a longer prompt's prefill. Jobs that end before (cancelled, refused at encoding) cost
        nothing and do not count.
        While no request has streamed past its first token (a burst reaching an idle server), there is no stream to
        protect yet: every admitted prompt runs whole, back to back (one forward is cheaper than pieces on a CPU,
        and the last first token comes sooner), as vLLM's prefill-first scheduler serves a burst; the first ones'
        second token waits for the burst's prefills."""
        if self.prefilling is not None:
            return self._prefill_next()
        while self.starting:
            job = self.starting[0]
            whole = not any(row.streaming for row in self.rows)
            self._start(job, whole)
            if self.prefilling is not None:  # a long prompt: it stays in `starting` until its last piece
                return self._prefill_next()
            self.starting.popleft()
            if job.stats.prompt_tokens and not whole:  # it got past its encoding: its prompt ran (or failed)
                return

    def _prefill_next(self) -> None:
        """The next piece of the chunked prefill in progress: the images first, then `prefill_chunk` prompt tokens
        at a time; after the last one the request joins the batch with its first token."""
        work = self.prefilling
        row, model = work.row, self.engine.model
        if row.job.cancelled.is_set():
            return self._prefilled(None)
        try:
            if work.done < 0:
                self.decoder.prefill_images(model, row.slot, work.encoded)
                work.done = 0
                return
            end = min(work.done + self.prefill_chunk, work.encoded.num_tokens)
            logits = self.decoder.prefill_chunk(model, row.slot, work.encoded, work.done, end)
            work.done = end
        except Exception as exc:  # the slot was never taken: the next request's prefill overwrites it
            row.job.context.run(log.exception, "prefill failed")
            self._deselect()
            return self._prefilled(failure("prefilling the prompt", exc))
        if logits is not None:
            if self._prefilled():  # cancelled while its last piece ran: it ends without a token
                return
            if row.slot != len(self.rows):  # rows ended meanwhile: take the first free slot
                self.decoder.move(row.slot, len(self.rows))
                row.slot = len(self.rows)
            self.rows.append(row)
            self._emit([row], logits)

    def _prefilled(self, error: BaseException | None = None) -> bool:
        """The chunked prefill in progress is over: its job leaves `starting`, and ends (True) on an error or a
        cancel; else it joins the batch."""
        job = self.prefilling.row.job
        self.prefilling = None
        self.starting.popleft()
        if error is not None or job.cancelled.is_set():
            _end(job, error)
            return True
        return False

    def _fail_active(self, error: BaseException) -> None:
        """End the running and starting requests with `error`; the waiting ones are served next."""
        for job in [row.job for row in self.rows] + list(self.starting):
            if not job.finished.is_set():
                _end(job, error)
        self.rows.clear()
        self.starting.clear()
        self.prefilling = None

    def _admit(self) -> list:
        """Waiting jobs that may start now, in arrival order, as many as there are free slots."""
        for job in [job for job in self.waiting if job.cancelled.is_set()]:
            self.waiting.remove(job)
            _end(job)
        room = self.decoder.max_batch - len(self.rows) if self.decoder else 1 - len(self.rows)
        # Any adapter joins the running batch: each row decodes with its own.
        return [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]

    def _start(self, job, whole: bool = False) -> None:
        """Select the job's adapter, encode it, and prefill it (its slot keeps the adapter; in pieces when longer
        than `prefill_chunk`, unless `whole`) or run it alone."""
        if job.cancelled.is_set():
            return _end(job)
        engine = self.engine
        stage = "selecting the adapter"
        try:
            if job.select_adapter:
                job.context.run(job.select_adapter)
            stage = "encoding the prompt"
            encoded = job.context.run(job.prepare) if callable(job.prepare) else job.prepare
            job.stats.prompt_tokens = encoded.num_tokens
            max_new_tokens = engine.fit_to_context(encoded.num_tokens, job.sampling.max_new_tokens)
        except Exception as exc:  # an input error (bad adapter, prompt too long) or a fault: this job only
            return _end(job, exc if explained(exc) else failure(stage, exc))
        if self.decoder is None or not self.decoder.fits(encoded):
            if self.decoder is not None:
                job.context.run(self._log_fallback, f"{encoded.pixel_values.shape[1]} images do not fit a slot")
            return self._generate(job, encoded, max_new_tokens)
        try:
            row = _Row(job, encoded.input_ids[0].tolist(), max_new_tokens, engine, len(self.rows))
            if encoded.num_tokens > self.prefill_chunk and not whole:  # continued by _prefill_next, per step
                self.prefilling = _Prefill(row, encoded)
                return
            logits = self.decoder.prefill(engine.model, row.slot, encoded)
        except Exception as exc:  # the slot was never taken: the next request's prefill overwrites it
            job.context.run(log.exception, "prefill failed")
            self._deselect()
            return _end(job, failure("prefilling the prompt", exc))
        self.rows.append(row)
        self._emit([row], logits)

    def _step(self) -> None:
        rows = self.rows
        cancelled = [i for i, row in enumerate(rows) if row.job.cancelled.is_set()]
        if cancelled:
            self._drop(cancelled)
        if rows:
            if len(rows) > self.largest_batch:
                self._log_batch(rows)
                self.largest_batch = len(rows)
            try:
                logits = self.decoder.decode(self.engine.model, [row.ids[-1] for row in rows],
                                             [len(row.ids) - 1 for row in rows])
            except Exception as exc:  # shared by every row: it cannot be pinned on one, so the step's rows end
                log.exception("decode step failed")
                return self._fail_active(failure("decoding (a step shared by the requests of one batch)", exc))
            self._emit(rows, logits)

    def _log_batch(self, rows: list) -> None:
        """A new largest batch: how many requests, and how many different adapters and scales they decode with
        (logged as the newest request's, so that it reaches the server's log)."""
        settings = len({row.job.adapter for row in rows})
        rows[-1].job.context.run(log.info, "decoding %d requests together (the most so far), with %d different "
                                 "adapter settings", len(rows), settings)

    def _emit(self, rows: list, logits: torch.Tensor) -> None:
        """Pick every row's next token (on the device, for the whole batch at once), hand each to its job, and drop
        the rows that are done (or failed)."""
        try:
            tokens, failed = self.sampler.pick(rows, logits)
        except Exception as exc:  # the batch's shared sampling: it cannot be pinned on one row, so its rows end
            log.exception("sampling a step failed")
            error = failure("sampling the next token", exc)
            return self._drop([row.slot for row in rows], {row.slot: error for row in rows})
        errors = {slot: failure("sampling the next token", exc) for slot, exc in failed.items()}
        done, eos = [], self.engine.eos_token_ids
        for row, token in zip(rows, tokens):
            if token is None:
                continue
            row.ids.append(token)
            try:
                row.job.sink([token])
            except Exception as exc:
                errors[row.slot] = failure("streaming the answer", exc)
                continue
            row.remaining -= 1
            if row.remaining == 0 or (token in eos and not row.job.sampling.ignore_eos):
                done.append(row.slot)
        if done or errors:
            self._drop(done + list(errors), errors)

    def _drop(self, slots: list[int], errors: dict | None = None) -> None:
        """End the rows in `slots` (with their error, if any); the last rows move into the freed slots, so slots
        0..n-1 stay active."""
        for slot in sorted(slots, reverse=True):
            _end(self.rows[slot].job, (errors or {}).get(slot))
            last = self.rows.pop()
            if slot < len(self.rows):
                self.decoder.move(last.slot, slot)
                self.sampler.move(last.slot, slot)
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
        except Exception as exc:
            self._deselect()
            return _end(job, failure("generating", exc))
        _end(job)

    def _deselect(self) -> None:
        """After a request's prefill failed, no adapter stays selected: every request selects its own before its
        prefill, and rows decode with their own (rowlora.py), so nothing reads the selection in between; this keeps
        a failure's state from outliving it all the same."""
        base = getattr(self.engine.model, "base_model", None)
        if hasattr(base, "disable_adapter_layers"):
            base.disable_adapter_layers()

    def _log_fallback(self, reason: str) -> None:
        if reason not in self.fallbacks_logged:
            self.fallbacks_logged.add(reason)
            log.warning("fast path: %s; this request (and any like it) is decoded with model.generate", reason)


def _end(job, error: BaseException | None = None) -> None:
    try:
        job.sink(error if error is not None else END)
    except Exception:  # a sink that fails cannot be told; the job is over all the same
        log.exception("a request's stream failed at its end")
    finally:
        job.finished.set()


@dataclass(eq=False)
class _Row:
    """A request in the running batch: its tokens so far, and its own generator when it samples."""

    job: object
    ids: list[int]  # prompt and generated tokens
    remaining: int  # tokens still allowed
    engine: object
    slot: int
    started: bool = False  # the sampler has marked its prompt's tokens (for the repetition penalty)
    generator: torch.Generator | None = field(init=False, default=None)

    def __post_init__(self):
        if self.sampling.temperature > 0:
            # Its own generator: a request's samples depend on its seed only, never on its batch.
            self.generator = torch.Generator(self.engine.device).manual_seed(self.job.stats.seed)

    @property
    def sampling(self):
        return self.job.sampling

    @property
    def streaming(self) -> bool:
        """Past its first token (which its prefill gave): a decode step has served it."""
        return len(self.ids) > self.job.stats.prompt_tokens + 1

    def draw(self, noise: torch.Tensor) -> None:
        """Fill `noise` (vocab,) with the Exp(1) draws `torch.multinomial` makes for one sample (`model.generate`'s
        draw), from this row's generator (BatchSampler.pick)."""
        noise.exponential_(generator=self.generator)


@dataclass(eq=False)
class _Prefill:
    """A long prompt's prefill in progress."""

    row: _Row
    encoded: object
    done: int = -1  # prompt tokens prefilled so far; -1: the images are still to be encoded


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
