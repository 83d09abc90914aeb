"""LoRA adapters on the live model: the default (`medical`, IDEFICS_ADAPTER_WEIGHTS) loaded in setup, a request's
`lora_weights` loaded once into the same PEFT model and kept while among the `max_loaded` most recently used, which
one a generation uses. A load that fails leaves the model as it was."""

import logging
import time
from collections import OrderedDict
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from idefics_cog.adapters.checks import CONFIG_FILE, WEIGHTS_FILE, layer_shapes, lora_key
from idefics_cog.adapters.downloads import AdapterDownloads, Fetched, source_key
from idefics_cog.config import MAX_ADAPTER_RANK
from idefics_cog.errors import AdapterError, InputError, WeightsError, shorten
from idefics_cog.weights.fetch_pool import Waiter

log = logging.getLogger(__name__)

MEDICAL = "medical"
NONE = "none"


class Adapters:
    """The adapters loaded on the engine's model, and which one the next generation uses."""

    def __init__(self, engine, weights_dir: Path, max_loaded: int = 4, budget_bytes: int = 4 << 30,
                 max_adapter_bytes: int = 1 << 30, download_seconds: float = 300.0,
                 max_rank: int = MAX_ADAPTER_RANK, fetch_threads: int = 4):
        self.engine, self.max_loaded = engine, max_loaded
        self.downloads = AdapterDownloads(layer_shapes(engine.model), weights_dir, budget_bytes, max_adapter_bytes,
                                          download_seconds, max_rank, fetch_threads)  # the plain base's layers
        self.custom: OrderedDict[str, str] = OrderedDict()  # source -> adapter name, least recently used first

    @property
    def names(self) -> list[str]:
        model = self.engine.model
        return list(model.peft_config) if isinstance(model, PeftModel) else []

    def fetch(self, source: str, allow_local: bool = False) -> Path:
        return self.downloads.fetch(source, allow_local)

    def start_fetch(self, source: str, allow_local: bool = False) -> Waiter:
        return self.downloads.start_fetch(source, allow_local)

    def load_default(self, source: str, origin: str = "IDEFICS_ADAPTER_WEIGHTS") -> str | None:
        """Setup: the `medical` adapter; `origin` says where the source was set, for the log and errors. Returns
        the base model the adapter says it was trained on (its `base_model_name_or_path`)."""
        started = time.perf_counter()
        try:
            fetched = self.downloads.operators(source)
            self.engine.run(self._load, fetched.path, MEDICAL, fetched.config)  # torch work on its thread
        except (AdapterError, WeightsError) as exc:
            # The same class (an UnreachableError stays one: setup says what else works), its message prefixed.
            kind = type(exc) if isinstance(exc, WeightsError) else WeightsError
            raise kind(f"adapter weights {source!r} ({origin}): {exc}") from None
        trained_on = self.engine.model.peft_config[MEDICAL].base_model_name_or_path
        log.info("adapter %r (the default) from %s (%s, trained on %s) loaded in %.1f s", MEDICAL, source, origin,
                 trained_on, time.perf_counter() - started)
        return trained_on

    def select(self, adapter: str = MEDICAL, lora_weights: str = "", lora_scale: float = 1.0,
               allow_local: bool = False, fetched: Fetched | None = None) -> str:
        """Point the model at the adapter a request asks for (`lora_weights` wins over `adapter`); returns its name,
        or "none" for the base model alone. `fetched`: what `start_fetch(lora_weights)` gave (fetched here when
        None). `allow_local`: for the operator's tools (evaluation), never for a request."""
        if lora_weights:
            name = self._custom(lora_weights, fetched or self.start_fetch(lora_weights, allow_local).result())
        elif adapter == MEDICAL:
            name = MEDICAL if MEDICAL in self.names else None  # IDEFICS_ADAPTER_WEIGHTS=none: the base model
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

    def _custom(self, source: str, fetched: Fetched) -> str:
        """Torch-thread part: load the fetched adapter into the model (once), or reuse it."""
        if source in self.custom:
            self.custom.move_to_end(source)
            return self.custom[source]
        started = time.perf_counter()
        name = f"custom_{source_key(source)}"
        if not fetched.path.is_dir():
            self.downloads.fetched.pop(source)
            raise InputError("lora_weights: the downloaded adapter left the disk before it was loaded; send the "
                             "request again")
        try:
            self._load(fetched.path, name, fetched.config)
        except (WeightsError, AdapterError) as exc:  # remembered: its next request costs the torch thread nothing
            raise InputError(self.downloads.refuse(source, str(exc))) from None
        self.custom[source] = name
        log.info("adapter %s from %s loaded in %.1f s", name, source, time.perf_counter() - started)
        while len(self.custom) > self.max_loaded:
            old_source, old_name = self.custom.popitem(last=False)
            self.engine.model.delete_adapter(old_name)
            log.info("adapter %s (%s) unloaded: more than %d loaded", old_name, old_source, self.max_loaded)
        return name

    def _load(self, path: Path, name: str, config: LoraConfig | None = None) -> None:
        """Add the adapter at `path` as `name`, with `config` (checked first when not given: the operator's tools);
        on any failure the model is left exactly as it was."""
        if config is None:
            path, config = (fetched := self.downloads.checked(path)).path, fetched.config
        model = self.engine.model
        wrapped_here = not isinstance(model, PeftModel)
        try:
            if wrapped_here:
                model = self.engine.model = PeftModel(model, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            load_lora_matrices(model, path, name)
            model.eval()
        except Exception as exc:
            if wrapped_here:
                self.engine.model = model.unload()  # takes the new LoRA layers out; the base layers are untouched
            elif name in model.peft_config:
                model.delete_adapter(name)
            raise AdapterError(f"could not be loaded ({type(exc).__name__}: {exc})") from None


def load_lora_matrices(model: PeftModel, path: Path, name: str) -> None:
    """Copy the adapter file's LoRA matrices into the `name` layers that `add_adapter` made, each filled exactly once,
    nothing else read or written. Not PEFT's `load_adapter`: it calls `state_dict()` on the whole model, which
    bitsandbytes 4-bit weights repacked on AVX512-BF16 CPUs come out of lossily."""
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
