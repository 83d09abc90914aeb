"""Generation: load the model, encode interleaved prompts, and stream each request's new text.

Requests are `Job`s (jobs.py) handed to the scheduler (scheduler.py), which runs all torch work on one thread and
decodes concurrent requests together. `stream` (sync) and `astream` (async, for Cog's concurrent predictor) turn a job's
token ids into text as they arrive.
"""

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from transformers import IdeficsConfig

from idefics_cog.config import ADAPTER_BANK_RANK
from idefics_cog.errors import InputError
from idefics_cog.inputs.prompt import END_OF_UTTERANCE, FAKE_IMAGE_TOKEN, IMAGE_TOKEN, Encoded, Segment, encode
from idefics_cog.model.loading import compute_dtype, load_model, pick_device
from idefics_cog.model.memory import ACTIVATIONS, DEFAULT_FRACTION, cache_bytes, minimum_cache_bytes
from idefics_cog.model.tokenizer import load_processor
from idefics_cog.serving.jobs import END, Job, Sampling, Stats
from idefics_cog.serving.scheduler import Scheduler
from idefics_cog.serving.textstream import TextStream

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model, processor, device: torch.device, engine: str = "auto", max_batch: int = 16,
                 max_images: int = 8, cache_fraction: float = DEFAULT_FRACTION,
                 generation_thread: "TorchThread | None" = None, compile: str = "auto",
                 bank_width: int = ADAPTER_BANK_RANK):
        """`generation_thread`: the thread that loaded `model`, if it was loaded on one. `compile`: whether the fast
        path's decode step runs compiled (auto: on CUDA); `bank_width`: its LoRA banks' rank columns (rowlora.py)."""
        self.model, self.processor, self.device = model, processor, device
        self.tokenizer = processor.tokenizer
        self.dtype = model.dtype  # the compute dtype, also for 8-bit and 4-bit weights
        self.last_stats: Stats | None = None
        self.generation_thread = generation_thread or TorchThread()
        self.model_context = model.config.max_position_embeddings
        self.cache_fraction = cache_fraction  # of the GPU's memory; the fast engine's cache is sized from it
        ids = self.tokenizer.convert_tokens_to_ids
        # Generation ends at the end of the assistant's turn (or at </s> for base models).
        self.eos_token_ids = [ids(END_OF_UTTERANCE), self.tokenizer.eos_token_id]
        self.banned_ids = [ids(IMAGE_TOKEN), ids(FAKE_IMAGE_TOKEN)]  # never generated
        self.scheduler = self.run(Scheduler, self, engine, max_batch, max_images, compile,  # allocates the caches
                                  bank_width)
        self.kind = self.scheduler.kind  # "fast" or "transformers": the decode path in use
        # Prompt + new tokens of one request: a fast-engine slot may be shorter than the model's context.
        decoder = self.scheduler.decoder
        self.context = decoder.max_len if decoder is not None else self.model_context

    @classmethod
    def load(cls, path: Path, device: str = "auto", quantization: str = "none", engine: str = "auto",
             max_batch: int = 16, max_images: int = 8, cache_fraction: float = DEFAULT_FRACTION,
             compile: str = "auto", bank_width: int = ADAPTER_BANK_RANK) -> "Engine":
        """Load a checkpoint directory: bf16 on GPU, float32 on CPU, optionally 8-bit or 4-bit (bitsandbytes).
        On one GPU when it fits there with its caches; spread over several only when not (placement.py)."""
        device = pick_device(device)
        dtype = compute_dtype(device)
        # What the GPU needs beside the weights: the fast engine's smallest cache (it then takes what is left,
        # FastDecoder.sized), or one request's full-context cache for model.generate.
        config = IdeficsConfig.from_pretrained(path)
        cache = (minimum_cache_bytes(config, max_images, dtype.itemsize) if engine in ("auto", "fast") else
                 cache_bytes(config, 1, max_images, dtype.itemsize))
        thread = TorchThread()
        model = thread.run(load_model, path, device, quantization, ACTIVATIONS + cache, fraction=cache_fraction).eval()
        return cls(model, load_processor(path), model.device, engine, max_batch, max_images, cache_fraction, thread,
                   compile, bank_width)

    def run(self, work: Callable, *args, **kwargs):
        """Run torch work (loading an adapter, encoding) on the generation thread and return its result."""
        return self.generation_thread.run(work, *args, **kwargs)

    def encode(self, segments: list[Segment], images: list[Image.Image]) -> Encoded:
        return self.run(encode, segments, images, self.processor)

    def fit_to_context(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """The number of new tokens that fits the context; a prompt that fills it is refused."""
        room = self.check_prompt(prompt_tokens)
        if max_new_tokens > room:
            log.info("max_new_tokens lowered from %d to %d to fit the context", max_new_tokens, room)
        return min(max_new_tokens, room)

    def check_prompt(self, prompt_tokens: int) -> int:
        """The room the prompt leaves for new tokens; a prompt that fills the context is refused."""
        room = self.context - prompt_tokens
        if room < 1:
            whose = ("the model's context" if self.context == self.model_context else
                     "the context per request that this server's GPU memory allows (IDEFICS_CACHE_MEMORY_FRACTION)")
            raise InputError(
                f"prompt: {prompt_tokens} tokens (text plus 3 per image) do not fit {whose} of "
                f"{self.context} tokens; shorten the prompt or send fewer images"
            )
        return room

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


class TorchThread(ThreadPoolExecutor):
    """The one thread on which a server does all its torch work: loading, adapters, encoding, decoding.
    Each thread that runs torch operations gets its own OpenMP team; once a process has two, OpenMP counts more
    threads than CPUs and makes its workers sleep between operations instead of spinning, and waking them costs
    every operation of a decode step (on 2 cores, a batch-16 step of bench-small took 1.3-1.6x as long with the
    model loaded on another thread: BENCHMARKS.md, issue 13). A new thread per request would build a team each time."""

    def __init__(self):
        super().__init__(max_workers=1, thread_name_prefix="generate")
        self.ident = self.submit(threading.get_ident).result()

    def run(self, work: Callable, *args, **kwargs):
        """`work(*args, **kwargs)` on this thread, its result (at once when called here: waiting for itself would
        never end)."""
        if threading.get_ident() == self.ident:
            return work(*args, **kwargs)
        return self.submit(work, *args, **kwargs).result()


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
