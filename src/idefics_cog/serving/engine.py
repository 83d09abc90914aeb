"""The engine: the loaded model, its scheduler and torch thread; `stream`/`astream` turn a job's tokens into text."""

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

from idefics_cog.config import ADAPTER_BANK_RANK, RequestLimits
from idefics_cog.errors import InputError
from idefics_cog.inputs.choices import candidate_ids, check_candidates
from idefics_cog.inputs.prompt import (
    END_OF_UTTERANCE,
    FAKE_IMAGE_TOKEN,
    IMAGE_TOKEN,
    Encoded,
    Segment,
    encode,
    tokenize,
)
from idefics_cog.model.loading import compute_dtype, load_model, pick_device
from idefics_cog.model.memory import ACTIVATIONS, DEFAULT_FRACTION, kv_cache_bytes, minimum_kv_cache_bytes
from idefics_cog.model.tokenizer import load_processor
from idefics_cog.serving.jobs import END, Job, Sampling, Stats
from idefics_cog.serving.scheduler import Scheduler
from idefics_cog.serving.scoring import choice_table
from idefics_cog.serving.textstream import TextStream

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model, processor, device: torch.device, decode_path: str = "auto", max_batch: int = 16,
                 max_images: int = 8, gpu_memory_fraction: float = DEFAULT_FRACTION,
                 torch_thread: "TorchThread | None" = None, compile: str = "auto",
                 bank_rank: int = ADAPTER_BANK_RANK):
        """`torch_thread`: the thread that loaded `model`, if any."""
        self.model, self.processor, self.device = model, processor, device
        self.tokenizer = processor.tokenizer
        self.dtype = model.dtype  # the compute dtype, also for 8-bit and 4-bit weights
        self.last_stats: Stats | None = None
        self.torch_thread = torch_thread or TorchThread()
        self.model_context_tokens = model.config.max_position_embeddings
        self.gpu_memory_fraction = gpu_memory_fraction
        ids = self.tokenizer.convert_tokens_to_ids
        self.eos_token_ids = [ids(END_OF_UTTERANCE), self.tokenizer.eos_token_id]
        self.banned_ids = [ids(IMAGE_TOKEN), ids(FAKE_IMAGE_TOKEN)]  # never generated
        self.scheduler = self.run(Scheduler, self, decode_path, max_batch, max_images, compile, bank_rank)
        self.decode_path = self.scheduler.decode_path  # the one in use: "fast" or "transformers"
        # Prompt + new tokens of one request: a fast-path slot may be shorter than the model's context.
        decoder = self.scheduler.decoder
        self.context_tokens = decoder.max_len if decoder is not None else self.model_context_tokens

    @classmethod
    def load(cls, path: Path, device: str = "auto", quantization: str = "none", decode_path: str = "auto",
             max_batch: int = 16, max_images: int = 8, gpu_memory_fraction: float = DEFAULT_FRACTION,
             compile: str = "auto", bank_rank: int = ADAPTER_BANK_RANK) -> "Engine":
        device = pick_device(device)
        dtype = compute_dtype(device)
        # Beside the weights: the fast path's smallest KV cache, or one full-context cache for model.generate.
        config = IdeficsConfig.from_pretrained(path)
        kv_cache = (minimum_kv_cache_bytes(config, max_images, dtype.itemsize) if decode_path in ("auto", "fast")
                    else kv_cache_bytes(config, 1, max_images, dtype.itemsize))
        thread = TorchThread()
        model = thread.run(load_model, path, device, quantization, ACTIVATIONS + kv_cache,
                           fraction=gpu_memory_fraction).eval()
        return cls(model, load_processor(path), model.device, decode_path, max_batch, max_images,
                   gpu_memory_fraction, thread, compile, bank_rank)

    def run(self, work: Callable, *args, **kwargs):
        """Torch work on the torch thread; its result."""
        return self.torch_thread.run(work, *args, **kwargs)

    def encode(self, segments: list[Segment], images: list[Image.Image]) -> Encoded:
        return self.run(encode, segments, images, self.processor)

    def fit_to_context(self, prompt_tokens: int, max_new_tokens: int) -> int:
        room = self.check_prompt(prompt_tokens)
        if max_new_tokens > room:
            log.info("max_new_tokens lowered from %d to %d to fit the context", max_new_tokens, room)
        return min(max_new_tokens, room)

    def check_prompt(self, prompt_tokens: int) -> int:
        """The room left for new tokens; a prompt that fills the context is refused."""
        room = self.context_tokens - prompt_tokens
        if room < 1:
            whose = ("the model's context" if self.context_tokens == self.model_context_tokens else
                     "the context per request that this server's GPU memory allows (IDEFICS_CACHE_MEMORY_FRACTION)")
            raise InputError(
                f"prompt: {prompt_tokens} tokens (text plus 3 per image) do not fit {whose} of "
                f"{self.context_tokens} tokens; shorten the prompt or send fewer images"
            )
        return room

    def candidate_ids(self, segments: list[Segment], texts: list[str], ids: list[int]) -> list[list[int]]:
        """Each candidate's tokens after the prompt's `ids` (inputs/choices.py). Scoring packs all candidates after
        the prompt in one forward (scoring.py): they must fit the model's context together (it takes no KV cache
        slot). A prompt that leaves no room for two tokens each is refused before it is tokenized again with each."""
        self._check_choices(len(ids), 2 * len(texts), "at least ")
        choices = candidate_ids(segments, texts, ids, self.tokenizer)
        self._check_choices(len(ids), sum(map(len, choices)))
        return choices

    def _check_choices(self, prompt_tokens: int, candidate_tokens: int, bound: str = "") -> None:
        context = self.model_context_tokens
        if prompt_tokens + candidate_tokens > context:
            raise InputError(f"choices: the prompt ({prompt_tokens} tokens, 3 per image) and the candidates "
                             f"({bound}{candidate_tokens} tokens in all) do not fit the model's context of {context} "
                             f"tokens; send fewer or shorter candidates")

    def choose(self, segments: list[Segment], images: list[Image.Image], texts: list[str],
               limits: RequestLimits = RequestLimits()) -> list[dict]:
        """`choices` in-process (the evaluation), checked as a request's are: each candidate's row of the choices
        table (stripped), in the order given, with the adapter selected now."""
        texts = check_candidates(list(texts), limits.choices, limits.choice_chars)
        ids = tokenize(segments, self.tokenizer)
        job = Job(encode(segments, images, self.processor, ids), Sampling(),
                  choices=self.candidate_ids(segments, texts, ids))
        for _ in self.stream(job):
            pass
        return choice_table(texts, job.scores)

    def generate_kwargs(self, encoded: Encoded, sampling: Sampling, max_new_tokens: int) -> dict:
        """`model.generate`'s arguments (the fast path reproduces exactly what they ask for)."""
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
        """The answer's text pieces as generated. Closing the iterator (or Cog's cancelation in the consumer) stops
        this request within one token; the rest of its batch goes on."""
        job = job if isinstance(job, Job) else Job(job, sampling)
        items: queue.Queue = queue.Queue()
        self.submit(job, items.put)
        reader = _Reader(self.tokenizer, job, self.eos_token_ids)
        try:
            while not reader.done:
                try:
                    # A timeout keeps Python code running, so that an asynchronous cancelation is delivered.
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
        """`stream` for an asyncio consumer; cancelling its task stops this request."""
        loop, items = asyncio.get_running_loop(), asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
                job.cancel()

        self.submit(job, put)
        reader = _Reader(self.tokenizer, job, self.eos_token_ids)
        try:
            while not reader.done:
                piece = reader.take(await items.get())
                if piece:
                    yield piece
        finally:
            job.cancel()
            job.stats.finish()


class TorchThread(ThreadPoolExecutor):
    """The one thread for all torch work: each torch thread gets its own OpenMP team, and with two OpenMP makes
    its workers sleep between operations, which slows every decode step on CPU."""

    def __init__(self):
        super().__init__(max_workers=1, thread_name_prefix="generate")
        self.ident = self.submit(threading.get_ident).result()

    def run(self, work: Callable, *args, **kwargs):
        """At once when called on this thread (waiting for itself would never end)."""
        if threading.get_ident() == self.ident:
            return work(*args, **kwargs)
        return self.submit(work, *args, **kwargs).result()


class _Reader:
    """A job's sink items to text pieces: whole words; a stop sequence ends the answer. Sets why it ended."""

    def __init__(self, tokenizer, job: Job, eos_token_ids: list[int]):
        self.job, self.text, self.done = job, TextStream(tokenizer, job.sampling.stop_sequences), False
        self.eos_token_ids = eos_token_ids

    def take(self, item) -> str:
        stats = self.job.stats
        if isinstance(item, BaseException):
            self.done = True
            stats.finish_reason = "error"
            raise item
        if item is END:
            self.done = True
            ended_turn = stats.ids and stats.ids[-1] in self.eos_token_ids
            stats.finish_reason = ("choice" if self.job.choices is not None else
                                   "cancel" if self.job.cancelled.is_set() else
                                   "end_of_turn" if ended_turn else "length")
            return self.text.finish()
        stats.add(item)
        piece = self.text.push(item)
        if self.text.stopped:
            self.done = True
            stats.finish_reason = "stop_sequence"
            self.job.cancel()
            piece += self.text.finish()
        return piece
