"""LoRA adapters on the loaded base model: the default one from setup, custom ones per request, no base reload.

- `medical` is the adapter named by `IDEFICS_ADAPTER_WEIGHTS` (MedIDEFICS by default), loaded in setup.
- `lora_weights` (an https URL of a tar/zip, or a hub id) loads a custom adapter into the same PEFT model.
  Downloads sit in `weights/adapters/`, least recently used first out past a byte budget; loaded adapters stay
  in memory, least recently used first out past a count. The same source again costs no download, no reload.
- Only the standard PEFT layout is accepted, and every LoRA matrix is checked against the base model's layers
  before anything touches the model; a load that still fails is rolled back, so the model stays as it was.
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
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from idefics_cog.errors import AdapterError, InputError
from idefics_cog.weights.archive import fetch_archive
from idefics_cog.weights.base import WeightsError
from idefics_cog.weights.hub import fetch_request_adapter
from idefics_cog.weights.lora import CONFIG_FILE, WEIGHTS_FILE, check_adapter, linear_shapes, lora_key, with_safetensors
from idefics_cog.weights.resolve import resolve
from idefics_cog.weights.sources import check_request_source, guarded_session

log = logging.getLogger(__name__)

MEDICAL = "medical"
NONE = "none"
FAILURE_MEMORY_S = 60.0  # a source that failed is refused with the same message for this long


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


class Adapters:
    """The adapters loaded on the engine's model, and which one the next generation uses."""

    def __init__(self, engine, cache_dir: Path, max_loaded: int = 4, cache_bytes: int = 4 << 30,
                 max_adapter_bytes: int = 1 << 30, download_seconds: float = 300.0):
        self.engine = engine
        self.shapes = linear_shapes(engine.model)
        self.cache_dir = Path(cache_dir) / "adapters"
        self.max_loaded, self.cache_bytes, self.max_adapter_bytes = max_loaded, cache_bytes, max_adapter_bytes
        self.download_seconds = download_seconds
        self.custom: OrderedDict[str, str] = OrderedDict()  # source -> adapter name, least recently used first
        # Fetching happens in request threads: these are shared between them, under _lock.
        self._lock = threading.Lock()
        self._source_locks: dict[str, threading.Lock] = {}  # one fetch per source at a time
        self._fetched: dict[str, Path] = {}  # source -> checked directory
        self._failures: dict[str, tuple[float, str]] = {}  # source -> (when, message)
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
            path = resolve(source, self.cache_dir.parent, adapter=True)
            self.engine.run(self._load, path, MEDICAL)  # torch work stays on the generation thread
        except (AdapterError, WeightsError) as exc:
            # The same class (UnreachableError stays one, so setup can say what else works), its message prefixed.
            kind = type(exc) if isinstance(exc, WeightsError) else WeightsError
            raise kind(f"adapter weights {source!r} ({origin}): {exc}") from None
        trained_on = self.engine.model.peft_config[MEDICAL].base_model_name_or_path
        log.info("adapter %r (the default) from %s (%s, trained on %s) loaded in %.1f s", MEDICAL, source, origin,
                 trained_on, time.perf_counter() - started)
        return trained_on

    def select(self, adapter: str = MEDICAL, lora_weights: str = "", lora_scale: float = 1.0,
               allow_local: bool = False, fetched: Path | None = None) -> str:
        """Point the model at the adapter a request asks for (`lora_weights` wins over `adapter`).
        Returns its name, or "none" for the base model alone. `fetched`: what `fetch(lora_weights)` returned (the
        server fetches before the scheduler; without it, it is fetched here). `allow_local` lets `lora_weights`
        name a local directory or any URL: for the operator's tools (evaluation), never for a request."""
        if lora_weights:
            name = self._custom(lora_weights, fetched or self.fetch(lora_weights, allow_local))
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
        """Everything a custom adapter needs before the model is touched: download, extraction, conversion of an
        adapter_model.bin, checks against the base model. Runs in the request's own thread, never on the torch
        thread, so a slow source delays its own request only. Requests for one source share one fetch; a source
        that failed is refused with the same message for FAILURE_MEMORY_S seconds. Returns the checked directory."""
        with self._lock:
            source_lock = self._source_locks.setdefault(source, threading.Lock())
        with source_lock:
            with self._lock:
                found, failed = self._fetched.get(source), self._failures.get(source)
            if found is not None and found.is_dir():
                return found
            if failed and time.monotonic() - failed[0] < FAILURE_MEMORY_S:
                raise InputError(failed[1])
            started = time.perf_counter()
            try:
                path = self._fetch(source, allow_local)
            except (WeightsError, AdapterError) as exc:
                message = f"lora_weights: {self._hide_paths(str(exc))}"
                with self._lock:
                    self._failures[source] = (time.monotonic(), message)
                raise InputError(message) from None
            with self._lock:
                self._fetched[source] = path
                self._failures.pop(source, None)
            log.info("adapter %s fetched and checked in %.1f s", source, time.perf_counter() - started)
            return path

    def _fetch(self, source: str, operator: bool) -> Path:
        """`operator`: a source from the operator's tools, with the freedom of the settings (local directories,
        any URL); else a request's, with the rules of sources.py."""
        if operator and Path(source).expanduser().is_dir():
            path, cache = Path(source).expanduser(), self.cache_dir.parent
        else:
            kind = "operator" if operator else check_request_source(source)
            cache = self.cache_dir / source_key(source)
            with self._lock:
                self._busy.add(cache)  # not trimmed while it is being filled
            try:
                path = self._download(source, kind, cache)
            finally:
                with self._lock:
                    self._busy.discard(cache)
        path = with_safetensors(path, cache)
        check_adapter(path, self.shapes)
        return path

    def _download(self, source: str, kind: str, entry: Path) -> Path:
        deadline = time.monotonic() + self.download_seconds
        try:
            if kind == "url":
                path = fetch_archive(source, entry, max_bytes=self.max_adapter_bytes, deadline=deadline,
                                     session=guarded_session())
            elif kind == "hub":
                repo_id, _, revision = source.partition("@")
                path = fetch_request_adapter(repo_id, revision or None, entry, self.max_adapter_bytes, deadline)
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

    def _hide_paths(self, message: str) -> str:
        """An error for the requester, without the server's directories in it."""
        for folder in {str(self.cache_dir.parent), str(self.cache_dir.parent.resolve())}:
            message = message.replace(folder, "<cache>")
        return message

    def _custom(self, source: str, path: Path) -> str:
        """Torch-thread part: load the fetched adapter at `path` into the model (once), or reuse it."""
        if source in self.custom:
            self.custom.move_to_end(source)
            return self.custom[source]
        started = time.perf_counter()
        name = f"custom_{source_key(source)}"
        if not path.is_dir():
            with self._lock:
                self._fetched.pop(source, None)
            raise InputError("lora_weights: the downloaded adapter left the disk cache before it was loaded; "
                             "send the request again")
        try:
            self._load(path, name)
        except (WeightsError, AdapterError) as exc:
            raise InputError(f"lora_weights: {self._hide_paths(str(exc))}") from None
        self.custom[source] = name
        log.info("adapter %s from %s loaded in %.1f s", name, source, time.perf_counter() - started)
        while len(self.custom) > self.max_loaded:
            old_source, old_name = self.custom.popitem(last=False)
            self.engine.model.delete_adapter(old_name)
            log.info("adapter %s (%s) unloaded: more than %d loaded", old_name, old_source, self.max_loaded)
        return name

    def _load(self, path: Path, name: str, cache: Path | None = None) -> None:
        """Add the adapter at `path` as `name` (an adapter_model.bin is converted under `cache`, the weights cache
        by default, first); on any failure the model is left exactly as it was."""
        path = with_safetensors(path, cache or self.cache_dir.parent)
        config = check_adapter(path, self.shapes)
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
                raise AdapterError(f"{key}: {module} is not among the target_modules of {CONFIG_FILE}")
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
