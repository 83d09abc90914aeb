"""Generation: encode an interleaved prompt, run `model.generate`, and stream the new text."""

import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    BitsAndBytesConfig,
    IdeficsForVisionText2Text,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from idefics_cog.errors import InputError
from idefics_cog.prompt import END_OF_UTTERANCE, FAKE_IMAGE_TOKEN, IMAGE_TOKEN, Encoded, Segment, encode
from idefics_cog.textstream import TextStream

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
    def __init__(self, model, processor, device: torch.device):
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
        self.banned = [[ids(IMAGE_TOKEN)], [ids(FAKE_IMAGE_TOKEN)]]

    @classmethod
    def load(cls, path: Path, device: str = "auto", quantization: str = "none") -> "Engine":
        """Load a checkpoint directory: bf16 on GPU, float32 on CPU, optionally 8-bit or 4-bit (bitsandbytes).
        On GPU, accelerate's `device_map="auto"` spreads a model too large for one GPU (the 80b) over all of them."""
        device = pick_device(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = IdeficsForVisionText2Text.from_pretrained(
            path, dtype=dtype, quantization_config=quantization_config(quantization, dtype),
            device_map="auto" if device.type == "cuda" else {"": "cpu"},
        ).eval()
        return cls(model, AutoProcessor.from_pretrained(path), model.device)

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

    def generate_kwargs(self, encoded: Encoded, sampling: Sampling) -> dict:
        kwargs = dict(
            **encoded.to(self.device, self.dtype),
            max_new_tokens=self.fit_to_context(encoded.num_tokens, sampling.max_new_tokens),
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            bad_words_ids=self.banned,
            repetition_penalty=sampling.repetition_penalty,
        )
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def stream(self, encoded: Encoded, sampling: Sampling) -> Iterator[str]:
        """Yield the answer as it is generated. Closing the iterator (or an exception in the consumer, such as
        Cog's cancelation) stops the generation itself within one token."""
        kwargs = self.generate_kwargs(encoded, sampling)
        tokens, stop = _TokenQueue(), threading.Event()
        kwargs.update(streamer=tokens, stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]))
        seed = sampling.seed if sampling.seed is not None else random.randrange(2**32)
        text = TextStream(self.tokenizer, sampling.stop_sequences)

        def run():
            try:
                with torch.inference_mode():
                    torch.manual_seed(seed)
                    self.model.generate(**kwargs)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                tokens.fail(exc)

        stats = self.last_stats = Stats(prompt_tokens=encoded.num_tokens, seed=seed)
        generation = self.generation_thread.submit(run)
        try:
            for ids in tokens:
                stats.add(ids)
                piece = text.push(ids)
                if piece:
                    yield piece
                if text.stopped:
                    break
            rest = text.finish()
            if rest:
                yield rest
        finally:
            stop.set()
            generation.result()  # `run` hands its errors to the consumer, so this only waits
            stats.finish()


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


class _TokenQueue(BaseStreamer):
    """Receives token ids from `generate` in its thread; iterating yields them in the consumer's thread."""

    _END = object()

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        self.queue.put(value.flatten().tolist())

    def end(self) -> None:
        self.queue.put(self._END)

    def fail(self, exc: BaseException) -> None:
        self.queue.put(exc)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            try:
                # A timeout keeps Python code running, so an asynchronous cancelation is delivered promptly.
                item = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
