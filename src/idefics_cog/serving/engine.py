"""Generation: load the model, encode interleaved prompts, and stream each request's new text.

Requests are `Job`s handed to the scheduler (batching.py), which runs all torch work on one thread and decodes
concurrent requests together. `stream` (sync) and `astream` (async, for Cog's concurrent predictor) turn a job's
token ids into text as they arrive.
"""

import asyncio
import contextvars
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import BitsAndBytesConfig, IdeficsConfig, IdeficsForVisionText2Text

from idefics_cog.serving.scheduler import END, Scheduler
from idefics_cog.errors import InputError
from idefics_cog.serving.decoder import cache_bytes
from idefics_cog.model.placement import ACTIVATIONS, place
from idefics_cog.inputs.prompt import END_OF_UTTERANCE, FAKE_IMAGE_TOKEN, IMAGE_TOKEN, Encoded, Segment, encode
from idefics_cog.quiet import no_loading_bars
from idefics_cog.serving.textstream import TextStream
from idefics_cog.model.tokenizer import load_processor

log = logging.getLogger(__name__)


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
        # JSON clients send `1` for 1.0 and may send `24.0` for 24 (the schema allows both): coerced once, here,
        # because transformers' logits processors refuse an int and range() refuses a float.
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.repetition_penalty = float(self.repetition_penalty)
        self.max_new_tokens, self.top_k = whole("max_new_tokens", self.max_new_tokens), whole("top_k", self.top_k)
        self.seed = None if self.seed is None else whole("seed", self.seed)


def whole(name: str, value: int | float) -> int:
    """`value` as an int; a float with a fraction is refused (the input's schema type is integer)."""
    if isinstance(value, float) and not value.is_integer():
        raise InputError(f"{name}: {value} is not a whole number")
    return int(value)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def quantization_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """MedIDEFICS's settings: nf4 with double quantization; the output and embedding layers stay unquantized."""
    keep = ["lm_head", "embed_tokens"]
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=keep)
    return None


class Engine:
    def __init__(self, model, processor, device: torch.device, engine: str = "auto", max_batch: int = 16,
                 max_images: int = 8):
        self.model, self.processor, self.device = model, processor, device
        self.tokenizer = processor.tokenizer
        self.dtype = model.dtype  # the compute dtype, also for 8-bit and 4-bit weights
        self.last_stats: Stats | None = None
        # All torch work runs on one long-lived thread. A new thread per request builds a new OpenMP team each
        # time, and torch calls from two threads make two teams that spin against each other on a small CPU
        # (measured on the tiny model on 2 cores: 1.3-1.7x the time of the same prediction on one thread).
        self.generation_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.context = model.config.max_position_embeddings
        ids = self.tokenizer.convert_tokens_to_ids
        # Generation ends at the end of the assistant's turn (or at </s> for base models).
        self.eos_token_ids = [ids(END_OF_UTTERANCE), self.tokenizer.eos_token_id]
        self.banned_ids = [ids(IMAGE_TOKEN), ids(FAKE_IMAGE_TOKEN)]  # never generated
        self.scheduler = Scheduler(self, engine, max_batch, max_images)
        self.kind = self.scheduler.kind  # "fast" or "transformers": the decode path in use

    @classmethod
    def load(cls, path: Path, device: str = "auto", quantization: str = "none", engine: str = "auto",
             max_batch: int = 16, max_images: int = 8) -> "Engine":
        """Load a checkpoint directory: bf16 on GPU, float32 on CPU, optionally 8-bit or 4-bit (bitsandbytes).
        On one GPU when it fits there with its caches; spread over several only when not (placement.py)."""
        device = pick_device(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # What the GPU needs beside the weights: the fast engine's caches for max_batch requests, or one
        # request's cache for model.generate.
        slots = max_batch if engine in ("auto", "fast") else 1
        working = ACTIVATIONS + cache_bytes(IdeficsConfig.from_pretrained(path), slots, max_images, dtype.itemsize)
        placement = place(path, device, quantization, working)
        no_loading_bars()
        model = IdeficsForVisionText2Text.from_pretrained(
            path, dtype=dtype, quantization_config=quantization_config(quantization, dtype),
            device_map=placement.device_map, max_memory=placement.max_memory,
        ).eval()
        return cls(model, load_processor(path), model.device, engine, max_batch, max_images)

    def encode(self, segments: list[Segment], images: list[Image.Image]) -> Encoded:
        return self.generation_thread.submit(encode, segments, images, self.processor).result()

    def fit_to_context(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """The number of new tokens that fits the context; a prompt that fills it is refused."""
        room = self.context - prompt_tokens
        if room < 1:
            raise InputError(
                f"prompt: {prompt_tokens} tokens (text plus 3 per image) do not fit the model's context of "
                f"{self.context} tokens; shorten the prompt or send fewer images"
            )
        if max_new_tokens > room:
            log.info("max_new_tokens lowered from %d to %d to fit the context", max_new_tokens, room)
        return min(max_new_tokens, room)

    def generate_kwargs(self, encoded: Encoded, sampling: Sampling, max_new_tokens: int) -> dict:
        """`model.generate`'s arguments for this request (the fast path reproduces exactly what they ask for)."""
        kwargs = dict(
            **encoded.to(self.device, self.dtype),
            max_new_tokens=max_new_tokens,
            eos_token_id=[-1] if sampling.ignore_eos else self.eos_token_ids,  # -1: no token ends it
            pad_token_id=self.tokenizer.pad_token_id,
            bad_words_ids=[[i] for i in self.banned_ids],
            repetition_penalty=sampling.repetition_penalty,
        )
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def submit(self, job: "Job", sink: Callable) -> None:
        """Queue `job`; `sink` then receives lists of new token ids, then `END` (or the exception that ended it)."""
        job.sink = sink
        self.last_stats = job.stats
        self.scheduler.submit(job)

    def stream(self, job: "Job | Encoded", sampling: Sampling | None = None) -> Iterator[str]:
        """Yield the answer as it is generated (`stream(encoded, sampling)` for a prompt already encoded).
        Closing the iterator (or an exception in the consumer, such as Cog's cancelation) stops the request's
        generation within one token; the other requests of its batch go on."""
        job = job if isinstance(job, Job) else Job(job, sampling)
        items: queue.Queue = queue.Queue()
        self.submit(job, items.put)
        reader = _Reader(self.tokenizer, job)
        try:
            while not reader.done:
                try:
                    # A timeout keeps Python code running, so an asynchronous cancelation is delivered promptly.
                    piece = reader.take(items.get(timeout=0.1))
                except queue.Empty:
                    continue
                if piece:
                    yield piece
        finally:
            job.cancel()
            job.finished.wait()
            job.stats.finish()

    async def astream(self, job: "Job") -> AsyncIterator[str]:
        """`stream` for an asyncio consumer: awaiting never blocks the event loop, so many requests stream at
        once. Cancelling the consumer's task stops this request's generation."""
        loop, items = asyncio.get_running_loop(), asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
                job.cancel()

        self.submit(job, put)
        reader = _Reader(self.tokenizer, job)
        try:
            while not reader.done:
                piece = reader.take(await items.get())
                if piece:
                    yield piece
        finally:
            job.cancel()
            job.stats.finish()


@dataclass(eq=False)
class Job:
    """One request for the scheduler."""

    prepare: Encoded | Callable[[], Encoded]  # the encoded prompt, or how to make it (run on the torch thread)
    sampling: Sampling
    adapter: Hashable = None  # jobs with different adapters never share a batch
    select_adapter: Callable[[], object] | None = None  # points the model at `adapter` (run on the torch thread)
    stats: "Stats" = field(init=False)
    sink: Callable | None = None  # set by Engine.submit
    # The submitter's context: the scheduler runs the job's own work in it, so that its log lines stay the
    # prediction's (coglet attributes logs through it).
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)  # the scheduler is done with it

    def __post_init__(self):
        seed = self.sampling.seed if self.sampling.seed is not None else random.randrange(2**32)
        self.stats = Stats(prompt_tokens=0, seed=seed)  # prompt_tokens: set once the scheduler has encoded it

    def cancel(self) -> None:
        self.cancelled.set()


class _Reader:
    """A job's sink items to text: token ids become whole words, stop sequences end the answer."""

    def __init__(self, tokenizer, job: Job):
        self.job, self.text, self.done = job, TextStream(tokenizer, job.sampling.stop_sequences), False

    def take(self, item) -> str:
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item is END:
            self.done = True
            return self.text.finish()
        self.job.stats.add(item)
        piece = self.text.push(item)
        if self.text.stopped:
            self.done = True
            self.job.cancel()
            piece += self.text.finish()
        return piece


@dataclass
class Stats:
    """What the last generation did: its token ids and its speed (logged, and read by tests and benchmarks)."""

    prompt_tokens: int
    seed: int
    ids: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    ended: float | None = None

    def add(self, ids: list[int]) -> None:
        self.first_token_at = self.first_token_at or time.perf_counter()
        self.ids.extend(ids)

    def finish(self) -> None:
        self.ended = time.perf_counter()
        if self.first_token_at is None:
            log.info("prompt %d tokens, no token generated (seed %d)", self.prompt_tokens, self.seed)
            return
        decoded = len(self.ids) - 1
        rate = decoded / (self.ended - self.first_token_at) if decoded > 0 else float("nan")
        log.info("prompt %d tokens, time to first token %.0f ms, %d new tokens at %.1f tokens/s (seed %d)",
                 self.prompt_tokens, 1000 * (self.first_token_at - self.started), len(self.ids), rate, self.seed)
