"""What one prediction does, from the request's inputs to streamed text; predict.py only declares the inputs."""

import asyncio
import concurrent.futures
import contextvars
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from idefics_cog.adapters.downloads import Fetched
from idefics_cog.config import Settings
from idefics_cog.errors import InputError, UnreachableError, WeightsError, shorten
from idefics_cog.inputs import images as image_files
from idefics_cog.inputs import messages as chat
from idefics_cog.inputs.choices import parse_choices
from idefics_cog.inputs.prompt import DEFAULT_PROMPT, Segment, build_segments, encode, tokenize
from idefics_cog.serving import files
from idefics_cog.serving.adapters import MEDICAL, NONE, Adapters
from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Job, Sampling, whole
from idefics_cog.serving.output import OUTPUT_FORMATS, chosen, document
from idefics_cog.serving.textstream import parse_stop_sequences
from idefics_cog.weights.download import resolve
from idefics_cog.weights.stream import Cancel
from idefics_cog.weights.weights_lock import WeightsLock

log = logging.getLogger(__name__)

WARMUP_TOKENS = 4  # enough for a prefill and a few decode steps
MAX_LOGPROBS = 20  # alternatives per generated token


class WarmUpError(RuntimeError):
    """Setup's warm-up prediction failed: the server would fail its users the same way."""


def check_trained_base(trained_on: str | None, base_weights: str) -> None:
    """Warn when the trained adapter names another base repo: its shapes fit, but its answers may be off."""
    if trained_on and trained_on.partition("@")[0] != base_weights.partition("@")[0]:
        log.warning("the trained adapter was trained on %s, this version serves %s (IDEFICS_BASE_WEIGHTS)",
                    trained_on, base_weights)


@contextmanager
def other_sources(variable: str, value: str, local: str, lock: WeightsLock | None = None):
    """Unreachable hub weights: name the setting, what else works, and why managed weights were refused."""
    try:
        yield
    except UnreachableError as exc:
        refused = f" ({lock.refused[variable]})" if lock and variable in lock.refused else ""
        raise WeightsError(f"{variable}={value}: {exc}{refused}. Set {variable} to {local} or an https URL of a "
                           f".tar/.zip, or HF_ENDPOINT to a reachable hub mirror") from exc


@dataclass
class Request:
    """A request's inputs, checked; nothing fetched, decoded or tokenized yet."""

    files: list[tuple[str, Path, str | None]]  # (input name, local file, the URL it is still to be fetched from)
    segments: list[Segment]
    sampling: Sampling
    adapter: str
    lora_weights: str
    lora_scale: float
    images: list | None = None  # `messages`: the segments' images in order (file index or data: URL); else the files
    choices: list[str] = field(default_factory=list)  # candidate answers to score instead of generating
    output_format: str = "text"
    logprobs: int = 0


class Service:
    def __init__(self, engine: Engine, adapters: Adapters, settings: Settings):
        self.engine, self.adapters, self.settings = engine, adapters, settings
        self.files: files.Files | None = None  # a Cog server's file inputs (receive_cog_files); else local paths

    @classmethod
    def from_env(cls, trained_weights: str | None = None) -> "Service":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        return cls.from_settings(Settings.from_env(trained_weights=trained_weights))

    @classmethod
    def from_settings(cls, settings: Settings) -> "Service":
        started = time.perf_counter()
        lock = WeightsLock.read(settings.weights_lock, settings.cache_dir)  # managed weights mounted by Cog, if any
        with other_sources("IDEFICS_BASE_WEIGHTS", settings.base_weights, "a checkpoint directory", lock):
            path = resolve(lock.source_for("IDEFICS_BASE_WEIGHTS", settings.base_weights), settings.cache_dir)
        log.info("base weights %s resolved to %s in %.1f s", settings.base_weights, path,
                 time.perf_counter() - started)
        started = time.perf_counter()
        engine = Engine.load(path, settings.device, settings.quantization, settings.decode_path, settings.max_batch,
                             settings.max_images, settings.gpu_memory_fraction, settings.compile,
                             settings.adapter_bank_rank)
        log.info("model loaded on %s (%s, quantization %s, %s decode path) in %.1f s", engine.device, engine.dtype,
                 settings.quantization, engine.decode_path, time.perf_counter() - started)
        adapters = Adapters(engine, settings.cache_dir, settings.max_loaded_adapters, settings.adapter_disk_bytes,
                            settings.max_adapter_bytes, settings.adapter_download_seconds, settings.max_adapter_rank,
                            settings.adapter_fetch_threads)
        if settings.trained_weights:
            log.info("a version made from a training: the default adapter is the trained one (COG_WEIGHTS), "
                     "not IDEFICS_ADAPTER_WEIGHTS (%s)", settings.adapter_weights or "none")
            trained_on = adapters.load_default(settings.trained_weights, "COG_WEIGHTS, the training's output")
            check_trained_base(trained_on, settings.base_weights)
        elif settings.adapter_weights:
            with other_sources("IDEFICS_ADAPTER_WEIGHTS", settings.adapter_weights, "none, an adapter directory",
                               lock):
                adapters.load_default(lock.source_for("IDEFICS_ADAPTER_WEIGHTS", settings.adapter_weights))
        service = cls(engine, adapters, settings)
        if settings.warmup:
            service.warm_up()
        return service

    def warm_up(self) -> None:
        """Compile the decode step at every bucket and run one short prediction and one scoring of `choices`, so
        that no user pays for their first run; it leaves every slot free. Raises WarmUpError, which fails setup."""
        started = time.perf_counter()
        try:
            decoder = self.engine.scheduler.decoder
            if decoder is not None:
                self.engine.run(decoder.warm_up, self.engine.model)
            with tempfile.TemporaryDirectory(prefix="idefics-warmup-") as folder:
                picture = Path(folder) / "warm-up.png"
                Image.new("RGB", (64, 64), (120, 130, 140)).save(picture)
                for _ in self.answer(prompt="Describe this image.", image=picture, max_new_tokens=WARMUP_TOKENS):
                    pass
                for _ in self.answer(prompt="Is this a picture?", image=picture, choices="yes,no"):  # scoring's
                    pass  # path (the model as transformers runs it) is first run here, not by a user
        except Exception as exc:
            raise WarmUpError(f"setup's warm-up prediction failed (IDEFICS_WARMUP=0 skips it): "
                              f"{type(exc).__name__}: {exc}") from exc
        log.info("warm-up: a %d-token prediction and a yes/no scoring in %.2f s", WARMUP_TOKENS,
                 time.perf_counter() - started)

    def receive_cog_files(self) -> None:
        files.install(self.settings.max_images)
        limits = self.settings.request_limits
        self.files = files.Files(self.settings.image_limits, limits.image_download_seconds)

    def answer(self, **inputs) -> Iterator[str]:
        """Input errors are raised when iteration starts."""
        request = self.check(**inputs)
        job = self.prepare(request, self.fetch(request))
        pieces = self.engine.stream(job)
        if request.choices or request.output_format == "json":
            yield self.result(request, job, "".join(pieces))
        else:
            yield from pieces

    def result(self, request: Request, job: Job, text: str) -> str:
        """The output of a request that does not stream its text: the chosen candidate, or the JSON document."""
        table = None
        if request.choices:
            text, table = chosen(request.choices, job)
        return text if request.output_format == "text" else document(job, text, self.engine.tokenizer, table)

    async def astream(self, record_metric: Callable[[str, object], None] | None = None,
                      **inputs) -> AsyncIterator[str]:
        """`answer` for the async predictor. `record_metric` gets the token metrics at the end, also on failure or
        cancel. Downloads wait on threads of their own; decoding and tokenization run on the default pool."""
        started = time.perf_counter()
        # `messages` may hold 100 MB of data: URLs, a tenth of a second to parse: not on the event loop.
        request = await asyncio.to_thread(self.check, **inputs) if inputs.get("messages") else self.check(**inputs)
        cancel = Cancel()
        try:
            fetched = await self.afetch(request, cancel)
            job = await asyncio.to_thread(self.prepare, request, fetched)
        except asyncio.CancelledError:
            cancel.set()
            raise
        try:
            async with aclosing(self.engine.astream(job)) as pieces:  # ended before the metrics are read
                if request.choices or request.output_format == "json":
                    text = "".join([piece async for piece in pieces])
                    # model.generate reports log-probabilities when it returns, which may be after the text's end.
                    await asyncio.to_thread(job.finished.wait)
                    yield self.result(request, job, text)
                else:
                    async for piece in pieces:
                        yield piece
        finally:
            if record_metric is not None:
                self.report(job.stats.metrics(started), record_metric)

    @staticmethod
    def report(metrics: dict, record_metric: Callable[[str, object], None]) -> None:
        """A failure here is logged, never the prediction's: the answer is already sent."""
        try:
            for name, value in metrics.items():
                record_metric(name, value)
        except Exception:  # noqa: BLE001 - e.g. coglet's "Failed to send metric"
            log.exception("the prediction's metrics could not be recorded")

    def read_images(self, files: list[tuple[str, Path]], order: list | None = None) -> list:
        """Resized at once as the processor would later: the queue holds small pictures, not 40-megapixel ones.
        `order`: `messages`' images (an index into `files`, or a data: URL); by default the files in order."""
        reduce = image_files.Reduction.of(self.engine.processor.image_processor)
        limits = self.settings.image_limits
        order = range(len(files)) if order is None else order
        return [image_files.load_image(*files[source], limits, reduce) if isinstance(source, int)
                else chat.load_data_image(source, limits, reduce) for source in order]

    def check(self, *, prompt: str = "", image: Path | None = None, images: list[Path] | None = None,
              template: str = "instruct", system_prompt: str = "", messages: str = "", max_new_tokens: int = 256,
              temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
              seed: int | None = None, stop_sequences: str = "", adapter: str = MEDICAL, lora_weights: str = "",
              lora_scale: float = 1.0, choices: str = "", output_format: str = "text", logprobs: int = 0) -> Request:
        """Sizes first, at a cost that does not grow with what was sent. `messages` replaces prompt, template and
        system_prompt; with neither prompt nor messages, the prompt is DEFAULT_PROMPT."""
        limits = self.settings.request_limits
        messages = messages.strip()
        if messages:
            given = [name for name, value in (("prompt", prompt), ("system_prompt", system_prompt),
                                              (f"template={shorten(template, 20)}", template != "instruct")) if value]
            if given:
                raise InputError(f"messages: cannot be combined with {', '.join(given)}; put the whole conversation "
                                 f"(its system message too) in messages")
        elif not prompt:
            prompt = DEFAULT_PROMPT
        if len(prompt) + len(system_prompt) > limits.prompt_chars:
            raise InputError(f"prompt, system_prompt: {len(prompt) + len(system_prompt)} characters; the limit is "
                             f"{limits.prompt_chars} (IDEFICS_MAX_PROMPT_CHARS)")
        if output_format not in OUTPUT_FORMATS:
            raise InputError(f"output_format: must be one of {', '.join(OUTPUT_FORMATS)}, got "
                             f"{shorten(repr(output_format), 40)}")
        logprobs = whole("logprobs", logprobs)
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise InputError(f"logprobs: {logprobs}; it must be from 0 to {MAX_LOGPROBS}")
        candidates = parse_choices(choices, limits.choices, limits.choice_chars)
        if candidates and logprobs:
            raise InputError("logprobs: reports generated tokens, and choices generates none; each candidate's "
                             "log-probability is in the choices table of output_format=json")
        if logprobs and output_format != "json":
            raise InputError("logprobs: reported in the JSON result only; add output_format=json")
        if len(lora_weights) > limits.lora_weights_chars:
            raise InputError(f"lora_weights: {len(lora_weights)} characters; the limit is "
                             f"{limits.lora_weights_chars} (IDEFICS_MAX_LORA_WEIGHTS_CHARS)")
        named = image_files.image_inputs(image, images)
        image_files.check_count(len(named), self.settings.max_images)
        received = (self.files.claim(named) if self.files is not None else
                    [(name, Path(path), None) for name, path in named])
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed,
                            stop_sequences=parse_stop_sequences(stop_sequences, limits))
        if messages:
            conversation = chat.read_messages(messages, len(named), self.settings.max_images, limits.prompt_chars)
            segments, order = conversation.segments, conversation.images
        else:
            segments, order = build_segments(prompt, len(named), template, system_prompt), None
        # JSON `1` arrives as an int; PEFT's scaling and the batch key want a float.
        return Request(received, segments, sampling, adapter, lora_weights, float(lora_scale), order, candidates,
                       output_format, logprobs)

    def fetch(self, request: Request) -> Fetched | None:
        self.fetch_images(request)
        return self.adapters.start_fetch(request.lora_weights).result() if request.lora_weights else None

    def fetch_images(self, request: Request, cancel: Cancel | None = None) -> None:
        remote = [(name, path, url) for name, path, url in request.files if url]
        deadline = self.files.deadline() if remote else None
        for name, path, url in remote:
            self.files.fetch(name, path, url, deadline, cancel)

    async def afetch(self, request: Request, cancel: Cancel) -> Fetched | None:
        """Image URLs on a thread of the request's own, the adapter on the adapters' fetch pool."""
        if any(url for _, _, url in request.files):
            await asyncio.wrap_future(own_thread(self.fetch_images, request, cancel))
        if not request.lora_weights:
            return None
        waiter = self.adapters.start_fetch(request.lora_weights)
        try:
            return await asyncio.wrap_future(waiter.future)
        finally:
            waiter.leave()

    def prepare(self, request: Request, fetched: Fetched | None) -> Job:
        """Decode images and tokenize (off the torch thread), refusing a prompt that does not fit now."""
        pictures = self.read_images([(name, path) for name, path, _ in request.files], request.images)
        ids = tokenize(request.segments, self.engine.tokenizer)
        choices = None
        if request.choices:
            choices = self.engine.candidate_ids(request.segments, request.choices, ids)
        else:
            self.engine.check_prompt(len(ids))
        adapter, lora_weights, lora_scale = request.adapter, request.lora_weights, request.lora_scale

        def select_adapter() -> None:
            name = self.adapters.select(adapter, lora_weights, lora_scale, fetched=fetched)
            log.info("adapter: %s (scale %g)", name, lora_scale)

        # The request's adapter as a label: lora_weights wins over adapter; `none` ignores the scale.
        key = (lora_weights, lora_scale) if lora_weights else (NONE,) if adapter == NONE else (adapter, lora_scale)
        return Job(encoded=lambda: encode(request.segments, pictures, self.engine.processor, ids),
                   sampling=request.sampling, adapter=key, select_adapter=select_adapter, choices=choices,
                   logprobs=request.logprobs)


def own_thread(work: Callable, *args) -> concurrent.futures.Future:
    """`work(*args)` on a new thread in the caller's contextvars: a slow download holds no pool's thread."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    request_context = contextvars.copy_context()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(request_context.run(work, *args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                future.set_exception(exc)

    threading.Thread(target=run, name="image-download", daemon=True).start()
    return future
