"""LoRA adapters on the loaded base model: the default one from setup, custom ones per request, no base reload.

- `medical` is the adapter named by `IDEFICS_ADAPTER_WEIGHTS` (MedIDEFICS by default), loaded in setup.
- `lora_weights` (an https URL of a tar/zip, or a hub id) loads a custom adapter into the same PEFT model.
  Downloads sit in `weights/adapters/`, least recently used first out past a byte budget; loaded adapters stay
  in memory, least recently used first out past a count. The same source again costs no download, no reload.
- Only the standard PEFT layout is accepted, its config by allow-list, and every LoRA matrix is checked against the
  base model's adaptable layers before anything touches the model (lora.py); matrices that are not finite are
  refused; a load that still fails is rolled back, so the model stays as it was.
- Fetches run on their own bounded pool (pool.py): requests naming one source share its fetch, a fetch nobody waits
  for any more stops, and a request without `lora_weights` never waits for one. What is remembered of sources (fetched, failed)
  is bounded, and a failed fetch leaves nothing in the cache.
- Loading an adapter never touches the base weights: the LoRA matrices are copied into the layers PEFT made for
  them, without PEFT's `load_adapter`, which calls `state_dict()` on the whole model. On CPUs with AVX512-BF16,
  bitsandbytes repacks 4-bit weights at the first forward and `state_dict()` unpacks them lossily, so answers
  would drift after every adapter loaded later (tests/model/test_quantized.py records what a machine does).
- An adapter published as `adapter_model.bin` only (many on the hub) is read with torch's weights-only unpickler
  (plain tensors and containers; any other object is refused before it is built, so no code in it runs), checked
  to hold LoRA matrices only, and written once as safetensors into the cache (`converted/<sha256>/`); PEFT only
  ever loads that. Every other pickle (pytorch_model.bin, .pt, .pkl, ...) stays refused.
"""

import hashlib
import logging
import shutil
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from idefics_cog.config import MAX_ADAPTER_RANK
from idefics_cog.errors import AdapterError, InputError, shorten
from idefics_cog.weights.archive import fetch_archive
from idefics_cog.weights.base import WeightsError
from idefics_cog.weights.hub import fetch_request_adapter
from idefics_cog.weights.cancel import Cancel, Cancelled
from idefics_cog.weights.lora import (CONFIG_FILE, WEIGHTS_FILE, check_adapter, check_values, layer_shapes, lora_key,
                                      with_safetensors)
from idefics_cog.weights.pool import FetchPool, Recent, Waiter
from idefics_cog.weights.resolve import resolve
from idefics_cog.weights.sources import check_request_source, guarded_session

log = logging.getLogger(__name__)

MEDICAL = "medical"
NONE = "none"
FAILURE_MEMORY_S = 60.0  # a source that failed is refused with the same message for this long
REMEMBERED_SOURCES = 256  # sources remembered as fetched, and as failed (each map)
MAX_MESSAGE_CHARS = 600  # of an error given to the requester


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


class Adapters:
    """The adapters loaded on the engine's model, and which one the next generation uses."""

    def __init__(self, engine, cache_dir: Path, max_loaded: int = 4, cache_bytes: int = 4 << 30,
                 max_adapter_bytes: int = 1 << 30, download_seconds: float = 300.0,
                 max_rank: int = MAX_ADAPTER_RANK, fetch_threads: int = 4):
        self.engine = engine
        self.layers = layer_shapes(engine.model)  # of the plain base model: adapters are checked against it
        self.cache_dir = Path(cache_dir) / "adapters"
        self.max_loaded, self.cache_bytes, self.max_adapter_bytes = max_loaded, cache_bytes, max_adapter_bytes
        self.download_seconds, self.max_rank = download_seconds, max_rank
        self.custom: OrderedDict[str, str] = OrderedDict()  # source -> adapter name, least recently used first
        self.fetches = FetchPool(fetch_threads, "adapter-fetch")  # fetch threads of their own, one fetch per source
        self._fetched = Recent(REMEMBERED_SOURCES)  # source -> its checked adapter (Fetched)
        self._failures = Recent(REMEMBERED_SOURCES, FAILURE_MEMORY_S)  # source -> the message it failed with
        self._lock = threading.Lock()
        self._busy: set[Path] = set()  # cache entries being filled
        self._disk_lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        model = self.engine.model
        return list(model.peft_config) if isinstance(model, PeftModel) else []

    def load_default(self, source: str, origin: str = "IDEFICS_ADAPTER_WEIGHTS") -> str | None:
        """Setup: the `medical` adapter, the default of this version (any weight source, local directories
        included); `origin` says where the source was set, for the log and errors. Returns the base model the
        adapter says it was trained on (its `base_model_name_or_path`)."""
        started = time.perf_counter()
        try:
            fetched = self._checked(resolve(source, self.cache_dir.parent, adapter=True))
            self.engine.run(self._load, fetched.path, MEDICAL, fetched.config)  # torch work on its thread
        except (AdapterError, WeightsError) as exc:
            # The same class (UnreachableError stays one, so setup can say what else works), its message prefixed.
            kind = type(exc) if isinstance(exc, WeightsError) else WeightsError
            raise kind(f"adapter weights {source!r} ({origin}): {exc}") from None
        trained_on = self.engine.model.peft_config[MEDICAL].base_model_name_or_path
        log.info("adapter %r (the default) from %s (%s, trained on %s) loaded in %.1f s", MEDICAL, source, origin,
                 trained_on, time.perf_counter() - started)
        return trained_on

    def select(self, adapter: str = MEDICAL, lora_weights: str = "", lora_scale: float = 1.0,
               allow_local: bool = False, fetched: "Fetched | None" = None) -> str:
        """Point the model at the adapter a request asks for (`lora_weights` wins over `adapter`).
        Returns its name, or "none" for the base model alone. `fetched`: what `fetch(lora_weights)` returned (the
        server fetches before the scheduler; without it, it is fetched here). `allow_local` lets `lora_weights`
        name a local directory or any URL: for the operator's tools (evaluation), never for a request."""
        if lora_weights:
            name = self._custom(lora_weights, fetched or self.start_fetch(lora_weights, allow_local).result())
        elif adapter == MEDICAL:
            # A server started without it (IDEFICS_ADAPTER_WEIGHTS=none) serves the base model for the default.
            name = MEDICAL if MEDICAL in self.names else None
        elif adapter == NONE:
            name = None
        else:
            raise InputError(f"adapter: must be 'medical' or 'none', got {adapter!r}")
        model = self.engine.model
        if not isinstance(model, PeftModel):
            return NONE
        if name is None:
            model.base_model.disable_adapter_layers()
            return NONE
        model.base_model.enable_adapter_layers()
        model.set_adapter(name)
        for module in model.modules():
            if isinstance(module, LoraLayer) and name in module.scaling:
                module.set_scale(name, lora_scale)
        return name

    def fetch(self, source: str, allow_local: bool = False) -> Path:
        """The checked directory of `start_fetch(...)`, waited for here (for a caller that may block)."""
        return self.start_fetch(source, allow_local).result().path

    def start_fetch(self, source: str, allow_local: bool = False) -> Waiter:
        """Everything a custom adapter needs before the model is touched: download, extraction, conversion of an
        adapter_model.bin, checks against the base model, on the fetch pool (never on the torch thread, nor on a
        thread any other request needs), so a slow source delays its own request only. Requests for one source
        share one fetch; a source that failed is refused with the same message for FAILURE_MEMORY_S seconds. The
        waiter's future gives the checked adapter (`Fetched`); the deadline runs from the start of its download."""
        found, failed = self._fetched.get(source), self._failures.get(source)
        if failed is not None or (found is not None and found.path.is_dir()):
            done: Future = Future()
            done.set_exception(InputError(failed)) if failed is not None else done.set_result(found)
            return Waiter(done, lambda: None)
        return self.fetches.join((source, allow_local),
                                 lambda cancel: self._fetch_checked(source, allow_local, cancel))

    def _fetch_checked(self, source: str, allow_local: bool, cancel: Cancel) -> "Fetched":
        started = time.perf_counter()
        deadline = time.monotonic() + self.download_seconds  # from its start: waiting for a thread is not its fault
        try:
            fetched = self._fetch(source, allow_local, deadline, cancel)
        except Cancelled:  # not the source's fault: not remembered
            raise
        except (WeightsError, AdapterError) as exc:
            message = self._message(str(exc), source)
        except Exception:  # a fault met on a stranger's files: the details (server paths) go to the log only
            log.exception("adapter %s could not be fetched", shorten(source))
            message = self._message("it could not be used (the server's log says why)", source)
        else:
            self._fetched.put(source, fetched)
            self._failures.pop(source)
            log.info("adapter %s fetched and checked in %.1f s", shorten(source), time.perf_counter() - started)
            return fetched
        self._failures.put(source, message)
        raise InputError(message)

    def _fetch(self, source: str, operator: bool, deadline: float, cancel: Cancel | None = None) -> "Fetched":
        """`operator`: a source from the operator's tools, with the freedom of the settings (local directories,
        any URL); else a request's, with the rules of sources.py. A request's cache entry that this fetch made is
        removed again when it fails."""
        if operator and Path(source).expanduser().is_dir():
            return self._checked(Path(source).expanduser())
        kind = "operator" if operator else check_request_source(source)
        cache = self.cache_dir / source_key(source)
        new = not cache.exists()
        with self._lock:
            self._busy.add(cache)  # not trimmed while it is being filled
        try:
            return self._checked(self._download(source, kind, cache, deadline, cancel), cache)
        except BaseException:
            if new:
                shutil.rmtree(cache, ignore_errors=True)
            raise
        finally:
            with self._lock:
                self._busy.discard(cache)

    def _download(self, source: str, kind: str, entry: Path, deadline: float, cancel: Cancel | None) -> Path:
        try:
            if kind == "url":
                path = fetch_archive(source, entry, max_bytes=self.max_adapter_bytes, deadline=deadline,
                                     session=guarded_session(), cancel=cancel)
            elif kind == "hub":
                repo_id, _, revision = source.partition("@")
                path = fetch_request_adapter(repo_id, revision or None, entry, self.max_adapter_bytes, deadline,
                                             cancel)
            else:
                path = resolve(source, entry, max_bytes=self.max_adapter_bytes, adapter=True)
            if directory_bytes(entry) > self.max_adapter_bytes:  # a hub repo offline is only measured once here
                shutil.rmtree(entry, ignore_errors=True)
                raise AdapterError(f"{source} is over the limit of {self.max_adapter_bytes} bytes per adapter "
                                   f"(IDEFICS_MAX_ADAPTER_BYTES)")
        finally:
            if entry.is_dir():
                (entry / ".last_used").touch()
                self._trim_disk_cache(keep=entry)  # partial downloads left by a failure count too
        return path

    def _message(self, problem: str, source: str) -> str:
        """An error for the requester: the source shortened, without the server's directories, of bounded length."""
        for folder in {str(self.cache_dir.parent), str(self.cache_dir.parent.resolve())}:
            problem = problem.replace(folder, "<cache>")
        for shown in {source, source.partition("#")[0]}:
            problem = problem.replace(shown, shorten(shown))
        return shorten(f"lora_weights: {problem}", MAX_MESSAGE_CHARS)

    def _checked(self, path: Path, cache: Path | None = None) -> "Fetched":
        """The adapter at `path` (an adapter_model.bin converted first, under `cache`, the weights cache by default),
        with every check of its files: here (a fetch thread, or setup), never on the torch thread, since a whole
        adapter's values are read and a hostile config's patterns cost CPU."""
        path = with_safetensors(path, cache or self.cache_dir.parent)
        config = check_adapter(path, self.layers, self.max_rank)
        check_values(path)
        return Fetched(path, config)

    def _custom(self, source: str, fetched: "Fetched") -> str:
        """Torch-thread part: load the fetched adapter into the model (once), or reuse it."""
        if source in self.custom:
            self.custom.move_to_end(source)
            return self.custom[source]
        started = time.perf_counter()
        name = f"custom_{source_key(source)}"
        if not fetched.path.is_dir():
            self._fetched.pop(source)
            raise InputError("lora_weights: the downloaded adapter left the disk cache before it was loaded; "
                             "send the request again")
        try:
            self._load(fetched.path, name, fetched.config)
        except (WeightsError, AdapterError) as exc:  # remembered: its next request costs the torch thread nothing
            message = self._message(str(exc), source)
            self._fetched.pop(source)
            self._failures.put(source, message)
            raise InputError(message) from None
        self.custom[source] = name
        log.info("adapter %s from %s loaded in %.1f s", name, source, time.perf_counter() - started)
        while len(self.custom) > self.max_loaded:
            old_source, old_name = self.custom.popitem(last=False)
            self.engine.model.delete_adapter(old_name)
            log.info("adapter %s (%s) unloaded: more than %d loaded", old_name, old_source, self.max_loaded)
        return name

    def _load(self, path: Path, name: str, config: LoraConfig | None = None) -> None:
        """Add the adapter at `path` as `name`, with `config` (what `_checked` made of it; made here when not given:
        the operator's tools); on any failure the model is left exactly as it was."""
        if config is None:
            fetched = self._checked(path)
            path, config = fetched.path, fetched.config
        model = self.engine.model
        wrapped_here = not isinstance(model, PeftModel)
        try:
            if wrapped_here:
                # On a failure below, unload() takes the new LoRA layers out again; the base layers are untouched.
                model = self.engine.model = PeftModel(model, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            load_lora_matrices(model, path, name)
            model.eval()
        except Exception as exc:
            if wrapped_here:
                self.engine.model = model.unload()  # takes the LoRA layers out again
            elif name in model.peft_config:
                model.delete_adapter(name)
            raise AdapterError(f"could not be loaded ({type(exc).__name__}: {exc})") from None

    def _trim_disk_cache(self, keep: Path) -> None:
        """Delete least recently used downloads until the cache fits its byte budget (never `keep`, nor one being
        filled)."""
        with self._disk_lock:
            self._trim_locked(keep)

    def _trim_locked(self, keep: Path) -> None:
        with self._lock:
            busy = set(self._busy)
        entries = [p for p in self.cache_dir.iterdir() if p.is_dir() and p != keep and p not in busy]
        entries.sort(key=lambda p: (p / ".last_used").stat().st_mtime if (p / ".last_used").exists() else 0)
        total = sum(directory_bytes(p) for p in entries) + directory_bytes(keep)
        while entries and total > self.cache_bytes:
            oldest = entries.pop(0)
            total -= directory_bytes(oldest)
            shutil.rmtree(oldest, ignore_errors=True)
            log.info("adapter cache: removed %s to stay under %d bytes", oldest.name, self.cache_bytes)


@dataclass(frozen=True)
class Fetched:
    """An adapter's checked files, and the LoraConfig to load them with."""

    path: Path
    config: LoraConfig


def load_lora_matrices(model: PeftModel, path: Path, name: str) -> None:
    """Copy the adapter file's LoRA matrices into the `name` layers that `add_adapter` made, every one of them
    filled exactly once (PEFT's `load_adapter` only warns about missing ones) and nothing else read or written."""
    layers = {module_name: module for module_name, module in model.base_model.model.named_modules()
              if isinstance(module, LoraLayer) and name in module.lora_A}
    filled = set()
    with safe_open(path / WEIGHTS_FILE, "pt") as tensors, torch.no_grad():
        for key in tensors.keys():
            module, part = lora_key(key)
            if module not in layers:
                raise AdapterError(f"{shorten(key)}: {module} is not among the target_modules of {CONFIG_FILE}")
            weight = getattr(layers[module], f"lora_{part}")[name].weight
            tensor = tensors.get_tensor(key)
            if tensor.shape != weight.shape:
                raise AdapterError(f"{key} has shape {list(tensor.shape)}, but {CONFIG_FILE} makes it "
                                   f"{list(weight.shape)} (r={model.peft_config[name].r})")
            weight.copy_(tensor)
            filled.add((module, part))
    missing = [f"{module}.lora_{part}" for module in layers for part in "AB" if (module, part) not in filled]
    if missing:
        raise AdapterError(f"{WEIGHTS_FILE} lacks {len(missing)} of the {2 * len(layers)} LoRA matrices that "
                           f"{CONFIG_FILE} asks for (first: {missing[0]})")


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
