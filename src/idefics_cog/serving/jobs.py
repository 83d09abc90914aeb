"""A request (`Job`), how it picks tokens (`Sampling`), what it did (`Stats`), and its place in the scheduler (`Row`
in the running batch, a chunked `Prefill`, model.generate's hooks)."""

import contextvars
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from idefics_cog.errors import InputError
from idefics_cog.inputs.prompt import Encoded

log = logging.getLogger(__name__)

MIN_TEMPERATURE = 0.01  # a temperature above 0 and below this samples at this one
END = object()  # the last item a job's sink receives after a normal end


@dataclass
class Sampling:
    """How to pick tokens. `temperature == 0` is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_sequences: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # benchmarks: always decode max_new_tokens tokens

    def __post_init__(self):
        # JSON sends 1 for 1.0 and 24.0 for 24: transformers' logits processors refuse an int, range() a float.
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        if 0 < self.temperature < MIN_TEMPERATURE:
            # Logits divided by 1e-40 overflow to inf and the draw becomes NaN (vLLM raises them the same way).
            log.info("temperature %g raised to %g, the smallest that samples without overflow", self.temperature,
                     MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        self.repetition_penalty = float(self.repetition_penalty)
        self.max_new_tokens, self.top_k = whole("max_new_tokens", self.max_new_tokens), whole("top_k", self.top_k)
        self.seed = None if self.seed is None else whole("seed", self.seed)


def whole(name: str, value: int | float) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise InputError(f"{name}: {value} is not a whole number")
    return int(value)


@dataclass(eq=False)
class Job:
    encoded: Encoded | Callable[[], Encoded]  # a callable runs on the torch thread
    sampling: Sampling
    adapter: Hashable = None  # a label of the adapter and scale it asks for
    select_adapter: Callable[[], object] | None = None  # runs on the torch thread
    # `choices`: each candidate's tokens after the prompt; the job scores them (`scores`) instead of generating.
    choices: list[list[int]] | None = None
    logprobs: int = 0  # alternatives reported per generated token (scoring.record_logprobs), 0: none
    scores: list[list[float]] | None = None  # per candidate, its tokens' log-probabilities
    token_logprobs: list[dict] = field(default_factory=list)  # per generated token, when `logprobs`
    stats: "Stats" = field(init=False)
    sink: Callable | None = None  # set by Engine.submit
    # The submitter's contextvars: coglet attributes log lines to a prediction through them.
    request_context: contextvars.Context = field(default_factory=contextvars.copy_context)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)  # the scheduler is done with it

    def __post_init__(self):
        seed = self.sampling.seed if self.sampling.seed is not None else random.randrange(2**32)
        self.stats = Stats(prompt_tokens=0, seed=seed)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Stats:
    """A generation's token ids and speed (logged, and read by tests and benchmarks)."""

    prompt_tokens: int
    seed: int
    ids: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    ended: float | None = None
    finish_reason: str | None = None  # end_of_turn, stop_sequence, length, choice, error or cancel (engine._Reader)

    def add(self, ids: list[int]) -> None:
        self.first_token_at = self.first_token_at or time.perf_counter()
        self.ids.extend(ids)

    def metrics(self, started: float) -> dict:
        """The metrics Replicate's models report (replicate/cog-vllm); `started` is a perf_counter time."""
        metrics = {"input_token_count": self.prompt_tokens, "output_token_count": len(self.ids)}
        if self.first_token_at is not None:
            metrics["time_to_first_token"] = self.first_token_at - started
        return metrics

    def finish(self) -> None:
        """The stream is over; one that stopped before the job's end was cancelled."""
        self.ended = time.perf_counter()
        self.finish_reason = self.finish_reason or "cancel"
        if self.finish_reason == "choice":
            log.info("prompt %d tokens, choices scored in %.0f ms", self.prompt_tokens,
                     1000 * (self.ended - self.started))
            return
        if self.first_token_at is None:
            log.info("prompt %d tokens, no token generated (seed %d)", self.prompt_tokens, self.seed)
            return
        decoded = len(self.ids) - 1
        rate = decoded / (self.ended - self.first_token_at) if decoded > 0 else float("nan")
        log.info("prompt %d tokens, time to first token %.0f ms, %d new tokens at %.1f tokens/s (seed %d), ended by "
                 "%s", self.prompt_tokens, 1000 * (self.first_token_at - self.started), len(self.ids), rate, self.seed,
                 self.finish_reason)


def end_job(job, error: BaseException | None = None) -> None:
    try:
        job.sink(error if error is not None else END)
    except Exception:  # a sink that fails cannot be told; the job is over all the same
        log.exception("a request's stream failed at its end")
    finally:
        job.finished.set()


@dataclass(eq=False)
class Row:
    job: object
    ids: list[int]  # prompt and generated tokens
    remaining: int  # tokens still allowed
    engine: object
    slot: int
    started: bool = False  # the sampler has marked its prompt's tokens as seen
    generator: torch.Generator | None = field(init=False, default=None)

    def __post_init__(self):
        if self.sampling.temperature > 0:
            # A request's samples depend on its seed only, never on its batch.
            self.generator = torch.Generator(self.engine.device).manual_seed(self.job.stats.seed)

    @property
    def sampling(self):
        return self.job.sampling

    def streaming(self, window: int) -> bool:
        """Past its first `window` tokens (Scheduler.burst_window)."""
        return len(self.ids) > self.job.stats.prompt_tokens + window

    def draw(self, noise: torch.Tensor) -> None:
        """The Exp(1) draws `torch.multinomial` makes for one sample, from this row's generator."""
        noise.exponential_(generator=self.generator)


@dataclass(eq=False)
class Prefill:
    """A long prompt's chunked prefill in progress."""

    row: Row
    encoded: object
    done: int = -1  # prompt tokens prefilled so far; -1: the images are still to be encoded


class NewTokens(BaseStreamer):
    """`generate`'s new tokens (not the prompt it passes first) to `sink`, a list of ids per step."""

    def __init__(self, sink):
        self.sink, self.prompt_seen = sink, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.sink(value.flatten().tolist())
        self.prompt_seen = True

    def end(self) -> None:
        pass


class Cancelled(StoppingCriteria):
    def __init__(self, job):
        self.job = job

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        stop = self.job.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
