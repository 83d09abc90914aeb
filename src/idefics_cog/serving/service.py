"""What one prediction does, from the request's inputs to streamed text; predict.py only declares the inputs."""

import asyncio
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from pathlib import Path

from PIL import Image

from idefics_cog.config import Settings
from idefics_cog.errors import UnreachableError, WeightsError
from idefics_cog.inputs import images as image_files
from idefics_cog.inputs.prompt import build_segments, encode
from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Job, Sampling
from idefics_cog.serving.textstream import parse_stop_sequences
from idefics_cog.weights.adapters import MEDICAL, NONE, Adapters
from idefics_cog.weights.managed import Lock
from idefics_cog.weights.resolve import resolve

log = logging.getLogger(__name__)

WARMUP_TOKENS = 4  # the warm-up prediction's new tokens: enough for a prefill and a few decode steps


class WarmUpError(RuntimeError):
    """Setup's warm-up prediction failed: the server would fail its users the same way."""


def check_trained_base(trained_on: str | None, base_weights: str) -> None:
    """Warn when the trained adapter names another base (`owner/name` and `owner/name@revision` are the same
    repo): its shapes fit (they were checked), but it was tuned against other weights, so its answers may be off."""
    if trained_on and trained_on.partition("@")[0] != base_weights.partition("@")[0]:
        log.warning("the trained adapter was trained on %s, this version serves %s (IDEFICS_BASE_WEIGHTS)",
                    trained_on, base_weights)


@contextmanager
def other_sources(variable: str, value: str, local: str, lock: Lock | None = None):
    """Weights the hub cannot give now (offline, no network): say which setting chose them and what else works
    (and why the managed weights mounted for it were not used, when they did not match weights.lock)."""
    try:
        yield
    except UnreachableError as exc:
        refused = f" ({lock.refused[variable]})" if lock and variable in lock.refused else ""
        raise WeightsError(f"{variable}={value}: {exc}{refused}. Set {variable} to {local} or an https URL of a "
                           f".tar/.zip, or HF_ENDPOINT to a reachable hub mirror") from exc


class Service:
    def __init__(self, engine: Engine, adapters: Adapters, settings: Settings):
        self.engine, self.adapters, self.settings = engine, adapters, settings

    @classmethod
    def from_env(cls, trained_weights: str | None = None) -> "Service":
        """`trained_weights`: setup's `weights` (COG_WEIGHTS, a training's output), or None."""
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        return cls.from_settings(Settings.from_env(trained_weights=trained_weights))

    @classmethod
    def from_settings(cls, settings: Settings) -> "Service":
        """Resolve (downloading if needed) and load the base model, then the default adapter."""
        started = time.perf_counter()
        lock = Lock.read(settings.weights_lock, settings.cache_dir)  # managed weights mounted by Cog, if any
        with other_sources("IDEFICS_BASE_WEIGHTS", settings.base_weights, "a checkpoint directory", lock):
            path = resolve(lock.source_for("IDEFICS_BASE_WEIGHTS", settings.base_weights), settings.cache_dir)
        log.info("base weights %s resolved to %s in %.1f s", settings.base_weights, path,
                 time.perf_counter() - started)
        started = time.perf_counter()
        engine = Engine.load(path, settings.device, settings.quantization, settings.engine, settings.max_batch,
                             settings.max_images, settings.cache_memory_fraction)
        log.info("model loaded on %s (%s, quantization %s, %s engine) in %.1f s", engine.device, engine.dtype,
                 settings.quantization, engine.kind, time.perf_counter() - started)
        adapters = Adapters(engine, settings.cache_dir, settings.max_loaded_adapters, settings.adapter_cache_bytes,
                            settings.max_adapter_bytes, settings.adapter_download_seconds)
        if settings.trained_weights:
            # A version made by `cog train`: the trained adapter is its default, in place of MedIDEFICS.
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
        """A short prediction through the whole path (an image, the default adapter, prefill, a few decode steps),
        then on CUDA the compiled decode step's batch shapes: the first users do not pay for either. Its answer
        is thrown away and leaves nothing behind (every slot is free again, each request selects its own adapter).
        Raises WarmUpError, so that setup fails, when it fails."""
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="idefics-warmup-") as folder:
                picture = Path(folder) / "warm-up.png"
                Image.new("RGB", (64, 64), (120, 130, 140)).save(picture)
                for _ in self.answer(prompt="Describe this image.", image=picture, max_new_tokens=WARMUP_TOKENS):
                    pass
            decoder = self.engine.scheduler.decoder
            shapes = 0 if decoder is None else self.engine.run(decoder.warm_up, self.engine.model)
        except Exception as exc:
            raise WarmUpError(f"setup's warm-up prediction failed (IDEFICS_WARMUP=0 skips it): "
                              f"{type(exc).__name__}: {exc}") from exc
        compiled = f", {shapes} compiled decode shapes" if shapes else ""
        log.info("warm-up: a %d-token prediction%s in %.2f s", WARMUP_TOKENS, compiled, time.perf_counter() - started)

    def answer(self, **inputs) -> Iterator[str]:
        """Stream the answer to one request (predict's inputs as keyword arguments). Input errors are raised
        when iteration starts."""
        yield from self.engine.stream(self.job(**inputs))

    async def astream(self, record_metric: Callable[[str, object], None] | None = None,
                      **inputs) -> AsyncIterator[str]:
        """`answer` for the concurrent (async) predictor: requests arriving together are decoded as one batch.
        `record_metric(name, value)` receives the request's token metrics when it ends (`Stats.metrics`; timed from
        here), also when it fails or is cancelled after its inputs were read."""
        started = time.perf_counter()
        job = await asyncio.to_thread(self.job, **inputs)  # image decoding stays off the event loop
        try:
            async with aclosing(self.engine.astream(job)) as pieces:  # its end counted before the metrics are read
                async for piece in pieces:
                    yield piece
        finally:
            if record_metric is not None:
                self.report(job.stats.metrics(started), record_metric)

    @staticmethod
    def report(metrics: dict, record_metric: Callable[[str, object], None]) -> None:
        """Hand `metrics` on; a failure there is logged, never the prediction's (the answer is already sent)."""
        try:
            for name, value in metrics.items():
                record_metric(name, value)
        except Exception:  # noqa: BLE001 - e.g. coglet's "Failed to send metric"
            log.exception("the prediction's metrics could not be recorded")

    def read_images(self, files: list[tuple[str, Path]]) -> list:
        """Decode each (name, path) and resize it at once to the vision tower's size, exactly as the processor
        would later: the queue holds small pictures, not 40-megapixel ones."""
        reduce = image_files.Reduction.of(self.engine.processor.image_processor)
        limits = self.settings.image_limits
        return [image_files.load_image(name, path, limits, reduce) for name, path in files]

    def job(self, *, prompt: str, image: Path | None = None, images: list[Path] | None = None,
            template: str = "instruct", system_prompt: str = "", max_new_tokens: int = 256,
            temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
            seed: int | None = None, stop_sequences: str = "", adapter: str = MEDICAL, lora_weights: str = "",
            lora_scale: float = 1.0) -> Job:
        """Check the inputs, read the images and fetch a custom adapter now (blocking: astream runs it in a thread);
        encoding and loading the adapter are the scheduler's (torch) work."""
        lora_scale = float(lora_scale)  # JSON `1` arrives as an int; PEFT's scaling and the batch key want a float
        files = image_files.image_inputs(image, images)
        image_files.check_count(len(files), self.settings.max_images)
        segments = build_segments(prompt, len(files), template, system_prompt)
        pictures = self.read_images(files)
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed,
                            stop_sequences=parse_stop_sequences(stop_sequences))

        # A custom adapter is fetched and checked here, in the request's thread: only loading it into the model
        # (from the local disk) is left to the torch thread, which every request shares.
        fetched = self.adapters.fetch(lora_weights) if lora_weights else None

        def select_adapter() -> None:
            name = self.adapters.select(adapter, lora_weights, lora_scale, fetched=fetched)
            log.info("adapter: %s (scale %g)", name, lora_scale)

        # The request's adapter as a label: lora_weights wins over adapter; `none` ignores the scale.
        key = (lora_weights, lora_scale) if lora_weights else (NONE,) if adapter == NONE else (adapter, lora_scale)
        return Job(prepare=lambda: encode(segments, pictures, self.engine.processor), sampling=sampling,
                   adapter=key, select_adapter=select_adapter)
