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
  would drift after every adapter loaded later (tests/test_quantized.py records what a machine does).
- An adapter published as `adapter_model.bin` only (many on the hub) is read with torch's weights-only unpickler
  (plain tensors and containers; any other object is refused before it is built, so no code in it runs), checked
  to hold LoRA matrices only, and written once as safetensors into the cache (`converted/<sha256>/`); PEFT only
  ever loads that. Every other pickle (pytorch_model.bin, .pt, .pkl, ...) stays refused.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

from idefics_cog.weights.archive import fetch_archive
from idefics_cog.errors import InputError
from idefics_cog.weights.hub import fetch_request_adapter
from idefics_cog.weights.sources import check_request_source, guarded_session
from idefics_cog.weights.base import ADAPTER_PICKLE, PICKLE_SUFFIXES, WeightsError
from idefics_cog.weights.resolve import resolve

log = logging.getLogger(__name__)

MEDICAL = "medical"
NONE = "none"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PICKLED_FILE = ADAPTER_PICKLE  # PEFT's older format: read with the weights-only unpickler, never by PEFT
# LoRA settings that add trained weights beyond the A/B matrices, or change the base layers (DoRA, copies of
# layers, full modules or token rows saved with the adapter): refused rather than half loaded.
UNSUPPORTED_SETTINGS = ("use_dora", "layer_replication", "modules_to_save", "trainable_token_indices", "lora_bias",
                        "target_parameters")
FAILURE_MEMORY_S = 60.0  # a source that failed is refused with the same message for this long
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that does not fit the base model or is not in the standard PEFT layout."""


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every Linear layer of the plain base model, by module name."""
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if hasattr(module, "in_features") and hasattr(module, "out_features")}


def check_adapter(path: Path, shapes: dict[str, tuple[int, int]]) -> LoraConfig:
    """Refuse anything but a LoRA adapter in the standard PEFT layout whose matrices fit the base model."""
    files = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if WEIGHTS_FILE not in files:
        pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickled:
            raise AdapterError(f"pickled weights ({', '.join(pickled)}) are refused: only {WEIGHTS_FILE} is loaded "
                               f"(or {PICKLED_FILE}, through torch's weights-only loader)")
        raise AdapterError(f"not a PEFT adapter: {WEIGHTS_FILE} is missing")
    if CONFIG_FILE not in files:
        raise AdapterError(f"not a PEFT adapter: {CONFIG_FILE} is missing")
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
    except ValueError as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON ({exc})") from None
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"only LoRA adapters are supported, this one is {raw.get('peft_type')!r}")
    try:
        with safe_open(path / WEIGHTS_FILE, "pt") as tensors:
            found = {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise AdapterError(f"{WEIGHTS_FILE} cannot be read ({exc})") from None
    if not found:
        raise AdapterError(f"{WEIGHTS_FILE} holds no tensors")
    for key, shape in found.items():
        module, part = lora_key(key)
        if module not in shapes:
            raise AdapterError(f"targets {module}, which the base model does not have (is it for another model?)")
        in_features, out_features = shapes[module]
        expected = in_features if part == "A" else out_features
        actual = shape[1] if part == "A" else shape[0]
        if len(shape) != 2 or actual != expected:
            raise AdapterError(f"{key} has shape {list(shape)}, which does not fit {module} "
                               f"({in_features} in, {out_features} out)")
    try:
        config = LoraConfig.from_pretrained(str(path))
    except Exception as exc:  # PEFT validates the fields in several ways
        raise AdapterError(f"{CONFIG_FILE} is not a valid LoRA config ({exc})") from None
    for field in UNSUPPORTED_SETTINGS:
        if getattr(config, field, None):
            raise AdapterError(f"{CONFIG_FILE} sets {field}, which is not supported (only plain LoRA matrices)")
    if config.bias != "none":
        raise AdapterError(f"{CONFIG_FILE} sets bias={config.bias!r}, which is not supported (only bias='none')")
    # Every matrix comes from the file (load_lora_matrices checks it), so PEFT initialises nothing: some of its
    # initialisations (PiSSA, OLoRA, ...) rewrite the base model's weights, which other requests share.
    config.init_lora_weights = False
    return config


def lora_key(key: str) -> tuple[str, str]:
    """(module, "A" or "B") of a LoRA matrix's tensor name; anything else is refused."""
    match = _LORA_KEY.match(key)
    if not match:
        raise AdapterError(f"unsupported tensor {key!r} (only LoRA A/B matrices are loaded)")
    return match["module"], match["part"]


def with_safetensors(path: Path, cache: Path) -> Path:
    """`path` itself, unless it holds an adapter published as adapter_model.bin only: then a directory under
    `cache/converted/` with its config and its tensors as adapter_model.safetensors, made once (atomically) and
    found again by the sha256 of the config and the .bin. The source directory is never written to: it may be the
    operator's own folder, a verified hub snapshot or a complete archive entry."""
    if not (path / PICKLED_FILE).is_file() or (path / WEIGHTS_FILE).exists():
        return path  # check_adapter says what is wrong with anything else
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"not a PEFT adapter: {CONFIG_FILE} is missing")
    digest = hashlib.sha256((path / CONFIG_FILE).read_bytes())
    with open(path / PICKLED_FILE, "rb") as stream:
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
    target = cache / "converted" / digest.hexdigest()[:32]
    if target.is_dir():
        return target
    started = time.perf_counter()
    tensors = load_pickled_lora(path / PICKLED_FILE)
    try:
        _write_converted(path / CONFIG_FILE, tensors, target)
    except OSError:  # the details name server paths: for the log, not for the requester
        log.exception("%s could not be converted into %s", PICKLED_FILE, target.parent)
        raise AdapterError(f"{PICKLED_FILE} could not be converted (the server could not write it; see its log)") from None
    log.info("%s: %d LoRA tensors converted to safetensors in %s in %.1f s", PICKLED_FILE, len(tensors), target,
             time.perf_counter() - started)
    return target


def _write_converted(config: Path, tensors: dict[str, torch.Tensor], target: Path) -> None:
    """Write the config and the tensors aside, then rename the folder into place: it appears complete or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copyfile(config, staging / CONFIG_FILE)
        save_file(tensors, staging / WEIGHTS_FILE)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # else another process converted the same adapter first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_pickled_lora(file: Path) -> dict[str, torch.Tensor]:
    """The LoRA matrices of a pickled adapter_model.bin, read by torch's weights-only unpickler: it builds only
    tensors and plain containers and refuses any other global before calling it, so a hostile pickle runs nothing."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a refused global; others for a file that is no torch file
        raise AdapterError(f"{PICKLED_FILE} is refused: torch's weights-only loader cannot read it as plain "
                           f"tensors ({type(exc).__name__}: {_unpickler_reason(exc)})") from None
    if not isinstance(state, dict) or not state:
        raise AdapterError(f"{PICKLED_FILE} is refused: it must hold a non-empty dict of LoRA tensors, "
                           f"not {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise AdapterError(f"{PICKLED_FILE} is refused: entry {key!r} is a {type(value).__name__}, not a tensor")
        try:
            lora_key(key)
        except AdapterError as exc:
            raise AdapterError(f"{PICKLED_FILE} is refused: {exc}") from None
    # Clones: safetensors refuses tensors that share memory (torch.save keeps views of one storage).
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def _unpickler_reason(exc: Exception) -> str:
    """The reason in torch's long message (which also suggests loading the file unsafely: not for our users)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. Please|\n|$)", text)
    return (found[1] if found else (text.strip().splitlines() or [type(exc).__name__])[0])[:300]


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
            self._load(resolve(source, self.cache_dir.parent, adapter=True), MEDICAL)
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
