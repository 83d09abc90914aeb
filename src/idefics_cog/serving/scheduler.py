"""The scheduler: every request's torch work on one thread, concurrent requests decoded as one batch (fast path),
or one at a time with model.generate (transformers path, and requests the fast path cannot hold). One request's
error ends that request alone; one that leaves the device unusable ends the worker (failures.py).
"""
import logging
import threading
from collections import deque

import torch

from idefics_cog.config import ADAPTER_BANK_RANK
from idefics_cog.serving import alone
from idefics_cog.serving.decoder import FastDecoder
from idefics_cog.serving.failures import explained, failure
from idefics_cog.serving.jobs import Prefill, Row, end_job
from idefics_cog.serving.sampler import BatchSampler
from idefics_cog.serving.scoring import record_rows

log = logging.getLogger(__name__)

_WAIT = object()  # _start: the job's adapter finds no room in the decode banks yet
# Prompt tokens prefilled between two decode steps: about one step's time on each device.
CHUNK_TOKENS = {"cuda": 256}
CHUNK_TOKENS_OTHER = 32
BURST_TOKENS = 2048  # packed into one forward for a burst at an idle server: bounds its masks and activations
# Requests sent together arrive tens of ms apart: those arriving before the first stream has this many tokens
BURST_WINDOW = 16  # are prefilled whole with the rest


class Scheduler:
    def __init__(self, engine, decode_path: str, max_batch: int, max_images: int, compile: str = "auto",
                 bank_rank: int = ADAPTER_BANK_RANK):
        self.engine = engine
        self.decode_path = "fast" if decode_path in ("auto", "fast") else "transformers"
        devices = set(getattr(engine.model, "hf_device_map", {}).values())
        if self.decode_path == "fast" and len(devices) > 1:
            log.warning("IDEFICS_ENGINE=%s: the model is spread over %d devices, which the fast path does not "
                        "support; decoding with model.generate", decode_path, len(devices))
            self.decode_path = "transformers"
        self.decoder = (FastDecoder.sized(engine.model, max_batch, max_images, engine.gpu_memory_fraction,
                                          compile=compile, banned_ids=engine.banned_ids, bank_rank=bank_rank)
                        if self.decode_path == "fast" else None)
        self.sampler = (BatchSampler(self.decoder.max_batch, engine.banned_ids, engine.device) if self.decoder
                        else None)
        self.banned = torch.tensor(engine.banned_ids, dtype=torch.long, device=engine.device)
        self.waiting: deque = deque()
        self.starting: deque = deque()  # admitted, not yet started
        self.lock = threading.Lock()
        self.running = False  # a `_serve` loop is on the torch thread
        self.rows: list[Row] = []  # the running batch; rows[i] lives in KV cache slot i
        self.chunk_tokens = CHUNK_TOKENS.get(engine.device.type, CHUNK_TOKENS_OTHER)
        self.prefilling: Prefill | None = None  # starting[0]'s long prompt, prefilled chunk by chunk
        self.fallbacks_logged: set[str] = set()
        self.largest_batch = 0  # for tests and benchmarks
        self.burst_window = BURST_WINDOW
        self.told_to_wait = None
        # (job, encoded, max_new_tokens) of starting[0] when prepared but left out of the last forward
        self.prepared: tuple | None = None
        self.reselect = False  # a job refused while a group gathered may have changed the selected adapter

    def submit(self, job) -> None:
        with self.lock:
            self.waiting.append(job)
            if self.running:
                return
            self.running = True
        self.engine.torch_thread.submit(self._serve)

    def _serve(self) -> None:
        """Run until no request is active or waiting. The catch-all is for a bug in the loop: it ends the active
        requests only."""
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
        """One chunk of prefill work between two decode steps, so running streams wait a bounded time per token.
        In a burst (no stream past its burst window) prompts run whole, up to BURST_TOKENS per forward, as vLLM's
        prefill-first scheduler does."""
        if self.prefilling is not None:
            return self._prefill_next()
        whole = not any(row.streaming(self.burst_window) for row in self.rows)
        spent = 0  # prompt tokens prefilled in this call
        while self.starting:
            group, more = self._gather(whole)
            if group:
                self._prefill_group(group)
                spent += sum(encoded.num_tokens for _, encoded in group)
            if self.prefilling is not None:  # a long prompt: it stays in `starting` until its last chunk
                return self._prefill_next()
            if not (whole and more) or (self.rows and spent >= BURST_TOKENS):
                return

    def _gather(self, whole: bool) -> tuple[list, bool]:
        """Admitted jobs for one forward: one adapter (PEFT's selection applies to the whole forward), at most
        `chunk_tokens` prompt tokens (BURST_TOKENS when `whole`); a longer prompt goes alone, in chunks unless
        `whole`. Returns the group and whether more may start now."""
        group, tokens = [], 0  # (row, encoded) each
        room = BURST_TOKENS if whole else self.chunk_tokens
        while len(self.starting) > len(group):
            job = self.starting[len(group)]
            if group and job.adapter != group[0][0].job.adapter:
                return group, True
            if self.prepared is not None and self.prepared[0] is job and not job.cancelled.is_set():
                prepared, self.prepared = self.prepared[1:], None
            else:
                self.prepared = None
                prepared = self._start(job)
            if prepared is _WAIT:
                return group, False
            if prepared is None:  # it ended (cancelled, refused): nothing ran
                del self.starting[len(group)]
                if group and job.select_adapter and not job.cancelled.is_set():  # a failed selection may have
                    self.reselect = True  # left another adapter selected
                continue
            encoded, max_new_tokens = prepared
            # A job that scores `choices` runs alone, as transformers defines the model (scoring.py).
            fast = job.choices is None and self.decoder is not None and self.decoder.fits(encoded)
            if group and (not fast or tokens + encoded.num_tokens > room):  # the next forward's (or generate's)
                self.prepared = (job, encoded, max_new_tokens)
                return group, True
            if job.choices is not None:
                self.starting.popleft()
                self._alone(alone.score, job, encoded)
                return group, False
            if not fast:
                self.starting.popleft()
                if self.decoder is not None:
                    job.request_context.run(self._log_fallback,
                                            f"{encoded.pixel_values.shape[1]} images do not fit a slot")
                job.request_context.run(log.info, "decoded by model.generate, one request at a time")
                self._alone(alone.generate, job, encoded, max_new_tokens)
                return group, False
            job.request_context.run(log.info, "decoded by the fast path, its decode step %s",
                                    self.decoder.step_mode)
            try:
                row = Row(job, encoded.input_ids[0].tolist(), max_new_tokens, self.engine,
                           len(self.rows) + len(group))
            except Exception as exc:
                job.request_context.run(log.exception, "prefill failed")
                del self.starting[len(group)]
                end_job(job, failure("prefilling the prompt", exc))
                continue
            if encoded.num_tokens > self.chunk_tokens and not whole:  # alone, in chunks
                self.prefilling = Prefill(row, encoded)
                return group, False
            group.append((row, encoded))
            tokens += encoded.num_tokens
        return group, True

    def _prefill_group(self, group: list) -> None:
        """One forward for the group; if it fails it is retried a prompt at a time, so only a prompt that fails alone
        ends."""
        model, deselected, self.reselect = self.engine.model, self.reselect, False
        if len(group) > 1 and not deselected:
            try:
                logits = self.decoder.prefill_together(model, [row.slot for row, _ in group],
                                                       [encoded for _, encoded in group])
            except Exception as exc:
                failure("prefilling the prompts of a burst", exc)  # a device-fatal error ends the worker here
                group[0][0].job.request_context.run(
                    log.exception, "prefilling %d prompts together failed; each is retried alone", len(group))
            else:
                for _ in group:
                    self.starting.popleft()
                self.rows.extend(row for row, _ in group)
                return self._emit([row for row, _ in group], torch.cat(logits))
        for row, encoded in group:
            job, error = row.job, None
            if job.cancelled.is_set():
                self.starting.popleft()
                end_job(job)
                continue
            stage = "selecting the adapter"
            try:
                if deselected and job.select_adapter:  # a failure before it deselected the group's adapter
                    job.request_context.run(job.select_adapter)
                deselected, stage = False, "prefilling the prompt"
                row.slot = len(self.rows)  # the first free slot (rows may have ended at their first token)
                logits = self.decoder.prefill(model, row.slot, encoded)
            except Exception as exc:  # the slot was never taken: the next request's prefill overwrites it
                job.request_context.run(log.exception, "prefill failed" if stage == "prefilling the prompt" else
                                        "selecting the adapter again failed")
                self._deselect()
                deselected = True
                error = exc if explained(exc) and stage != "prefilling the prompt" else failure(stage, exc)
            self.starting.popleft()
            if error is not None:
                end_job(job, error)
                continue
            self.rows.append(row)
            self._emit([row], logits)

    def _prefill_next(self) -> None:
        """The next chunk of the prefill in progress: the images first, then `chunk_tokens` prompt tokens."""
        work = self.prefilling
        row, model = work.row, self.engine.model
        if row.job.cancelled.is_set():
            return self._prefilled(None)
        try:
            if work.done < 0:
                self.decoder.prefill_images(model, row.slot, work.encoded)
                work.done = 0
                return
            end = min(work.done + self.chunk_tokens, work.encoded.num_tokens)
            logits = self.decoder.prefill_chunk(model, row.slot, work.encoded, work.done, end)
            work.done = end
        except Exception as exc:  # the slot was never taken: the next request's prefill overwrites it
            row.job.request_context.run(log.exception, "prefill failed")
            self._deselect()
            return self._prefilled(failure("prefilling the prompt", exc))
        if logits is not None:
            if self._prefilled():  # cancelled while its last chunk ran: it ends without a token
                return
            if row.slot != len(self.rows):  # rows ended meanwhile: take the first free slot
                self.decoder.move(row.slot, len(self.rows))
                row.slot = len(self.rows)
            self.rows.append(row)
            self._emit([row], logits)

    def _prefilled(self, error: BaseException | None = None) -> bool:
        """The chunked prefill is over; True when its job ended (an error or a cancel)."""
        job = self.prefilling.row.job
        self.prefilling = None
        self.starting.popleft()
        if error is not None or job.cancelled.is_set():
            end_job(job, error)
            return True
        return False

    def _fail_active(self, error: BaseException) -> None:
        """The waiting requests are served next."""
        for job in [row.job for row in self.rows] + list(self.starting):
            if not job.finished.is_set():
                end_job(job, error)
        self.rows.clear()
        self.starting.clear()
        self.prefilling = None
        self.prepared = None

    def _admit(self) -> list:
        """As many waiting jobs as there are free slots, in arrival order, and every job that scores `choices`
        (it takes no slot: behind a full batch it waits only for the next decode step)."""
        for job in [job for job in self.waiting if job.cancelled.is_set()]:
            self.waiting.remove(job)
            end_job(job)
        room = self.decoder.max_batch - len(self.rows) if self.decoder else 1 - len(self.rows)
        admitted = []
        for job in list(self.waiting):
            if job.choices is None:
                if room < 1:
                    continue
                room -= 1
            self.waiting.remove(job)
            admitted.append(job)
        return admitted

    def _start(self, job):
        """(encoded, max_new_tokens), None when the job ended, or _WAIT while its adapter finds no room in the decode
        banks."""
        if job.cancelled.is_set():
            return end_job(job)
        engine = self.engine
        stage = "selecting the adapter"
        try:
            if job.select_adapter:
                job.request_context.run(job.select_adapter)
            if job.choices is None and self.decoder and not self.decoder.lora.fits(self.decoder.base, len(self.rows)):
                if self.told_to_wait is not job:  # said once
                    job.request_context.run(log.info,
                                            "waiting for room in the LoRA banks (IDEFICS_ADAPTER_BANK_RANK)")
                    self.told_to_wait = job
                return _WAIT
            stage = "encoding the prompt"
            encoded = job.request_context.run(job.encoded) if callable(job.encoded) else job.encoded
            job.stats.prompt_tokens = encoded.num_tokens
            max_new_tokens = (0 if job.choices is not None else  # checked against the model's context at prepare
                              engine.fit_to_context(encoded.num_tokens, job.sampling.max_new_tokens))
        except Exception as exc:  # an input error (bad adapter, prompt too long) or a fault: this job only
            return end_job(job, exc if explained(exc) else failure(stage, exc))
        return encoded, max_new_tokens

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
                step = self.decoder.decode(self.engine.model, [row.ids[-1] for row in rows],
                                           [len(row.ids) - 1 for row in rows])
            except Exception as exc:  # cannot be pinned on one row: the step's rows end
                log.exception("decode step failed")
                return self._fail_active(failure("decoding (a step shared by the requests of one batch)", exc))
            self._emit(rows, step.logits, step.tokens)

    def _log_batch(self, rows: list) -> None:
        """Logged as the newest request's, so that it reaches the server's log."""
        distinct = len({row.job.adapter for row in rows})
        rows[-1].job.request_context.run(log.info, "decoding %d requests together (the most so far), with %d "
                                         "different adapter settings", len(rows), distinct)

    def _emit(self, rows: list, logits: torch.Tensor, greedy: torch.Tensor | None = None) -> None:
        """Pick, hand on and drop the finished rows; `greedy`: the decode step's argmax, which greedy rows take."""
        reporting = [index for index, row in enumerate(rows) if row.job.logprobs]
        try:
            raw = logits[reporting] if reporting else None  # a copy: `pick` processes the logits in place
            tokens, failed = self.sampler.pick(rows, logits, greedy)
            if greedy is not None:
                self.decoder.advance(self.sampler.tokens, tokens)
        except Exception as exc:  # cannot be pinned on one row
            log.exception("sampling a step failed")
            error = failure("sampling the next token", exc)
            return self._drop([row.slot for row in rows], {row.slot: error for row in rows})
        errors = {slot: failure("sampling the next token", exc) for slot, exc in failed.items()}
        if reporting:
            errors.update(record_rows(rows, reporting, raw, tokens, self.banned))
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
        """The last rows move into the freed slots, so slots 0..n-1 stay active."""
        for slot in sorted(slots, reverse=True):
            end_job(self.rows[slot].job, (errors or {}).get(slot))
            last = self.rows.pop()
            if slot < len(self.rows):
                self.decoder.move(last.slot, slot)
                self.sampler.move(last.slot, slot)
                last.slot = slot
                self.rows[slot] = last

    def _alone(self, run, job, *args) -> None:
        """`run` (alone.py) serves the request by itself; after a failure no adapter stays selected."""
        try:
            run(self.engine, job, *args, self.banned)
        except Exception as error:  # failures.failure's GenerationError, naming the stage
            self._deselect()
            return end_job(job, error)
        end_job(job)

    def _deselect(self) -> None:
        """After a failed prefill no adapter stays selected, so a failure's state never outlives it."""
        base = getattr(self.engine.model, "base_model", None)
        if hasattr(base, "disable_adapter_layers"):
            base.disable_adapter_layers()
        self.prepared = None  # its adapter must be selected again

    def _log_fallback(self, reason: str) -> None:
        if reason not in self.fallbacks_logged:
            self.fallbacks_logged.add(reason)
            log.warning("fast path: %s; this request (and any like it) is decoded with model.generate", reason)
