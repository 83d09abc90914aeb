"""An adapter's files: the standard PEFT layout, every LoRA matrix checked against the base model's layers before
anything touches the model, and PEFT's older adapter_model.bin read with torch's weights-only unpickler (any object
other than tensors and containers is refused before it is built) and written once as safetensors."""

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from idefics_cog.errors import AdapterError
from idefics_cog.weights.base import ADAPTER_PICKLE, PICKLE_SUFFIXES

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PICKLED_FILE = ADAPTER_PICKLE  # PEFT's older format: read with the weights-only unpickler, never by PEFT
# LoRA settings that add trained weights beyond the A/B matrices, or change the base layers (DoRA, copies of
# layers, full modules or token rows saved with the adapter): refused rather than half loaded.
UNSUPPORTED_SETTINGS = ("use_dora", "layer_replication", "modules_to_save", "trainable_token_indices", "lora_bias",
                        "target_parameters")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[\w-]+)?\.weight$")


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
