"""An adapter's files, written by a stranger, checked before anything touches the model: the PEFT layout, its config
by allow-list, every LoRA matrix against the base model's adaptable layers, the rank limit, finite values; an
adapter_model.bin read by torch's weights-only unpickler only, and written once as safetensors."""

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from idefics_cog.config import MAX_ADAPTER_RANK
from idefics_cog.errors import AdapterError, shorten
from idefics_cog.weights.source import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS, PICKLE_SUFFIXES

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE, PICKLED_FILE = ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_PICKLE
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is about 1 kB
MAX_HEADER_BYTES = 8 << 20  # the safetensors header (names and shapes): MedIDEFICS's is about 70 kB
NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}  # BF16, numpy lacks: by its bits
FLOAT_DTYPES = (*NUMPY_DTYPES, "BF16")
MAX_ALPHA = 1e6  # lora_alpha and alpha_pattern values: MedIDEFICS's is 32
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>[\w.-]+)\.lora_(?P<part>[AB])(?:\.[\w-]+)?\.weight$")
_PLAIN_NAME = re.compile(r"^[\w.-]{1,200}$")  # a module name or suffix: no regular-expression operators

# Where a request's adapter reaches only its own rows (serving/rowlora.py); never lm_head or the embeddings, which the
# decode step calls directly for every row.
ADAPTABLE = ("model.layers.", "model.gated_cross_attn_layers.", "model.perceiver_resampler.",
             "model.vision_model.encoder.")

# adapter_config.json by allow-list: the settings the serving path implements, each checked ...
CHECKED = ("peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "bias", "use_rslora")
IGNORED = {"init_lora_weights": (bool, str), "inference_mode": (bool,), "lora_dropout": (int, float)}  # at inference
METADATA = {"task_type": (str,), "auto_mapping": (dict,), "peft_version": (str,), "base_model_name_or_path": (str,),
            "revision": (str,)}  # read by nothing here; null too
LEGACY = {"enable_lora": None, "merge_weights": False}  # PEFT 0.3's fields, at the values that mean nothing
MAX_PATTERN_KEYS = 256  # of rank_pattern and of alpha_pattern: PEFT compiles each key for every layer
# ... and any other LoraConfig field only at PEFT's default, which is what leaving it out means. Anything else (DoRA,
# KaSA, layer copies, saved modules, ...) changes the base layers or adds weights: refused by name before loading.
_DEFAULTS = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
             for f in dataclasses.fields(LoraConfig) if f.init}
DEFAULTS = {**LEGACY, **{name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
                         for name, value in _DEFAULTS.items() if name not in (*CHECKED, *IGNORED, *METADATA)}}


def layer_shapes(model) -> dict[str, tuple[int, int] | None]:
    """Every module of the plain base model by name: (in_features, out_features) for a Linear layer, else None."""
    return {name: (module.in_features, module.out_features) if isinstance(module, torch.nn.Linear) else None
            for name, module in model.named_modules() if name}


def adaptable(name: str, layers: dict[str, tuple[int, int] | None]) -> bool:
    return layers.get(name) is not None and name.startswith(ADAPTABLE)


def check_adapter(path: Path, layers: dict[str, tuple[int, int] | None],
                  max_rank: int = MAX_ADAPTER_RANK) -> LoraConfig:
    """Refuse anything but a PEFT LoRA adapter whose matrices fit the base's adaptable `layers` (layer_shapes). The
    LoraConfig returned names the file's exact layers and ranks: PEFT matches no pattern of the stranger's."""
    files = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if WEIGHTS_FILE not in files:
        pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickled:
            raise AdapterError(f"pickled weights ({', '.join(shorten(f, 40) for f in pickled[:4])}) are refused: only "
                               f"{WEIGHTS_FILE} is loaded (or {PICKLED_FILE}, through torch's weights-only loader)")
        raise AdapterError(f"not a PEFT adapter: {WEIGHTS_FILE} is missing")
    if CONFIG_FILE not in files:
        raise AdapterError(f"not a PEFT adapter: {CONFIG_FILE} is missing")
    raw = read_config(path / CONFIG_FILE)
    settings = checked_settings(raw, max_rank)
    matrices = read_shapes(path / WEIGHTS_FILE, layers)
    targets = settings["target_modules"]
    for name in targeted_layers(targets, layers):
        if name not in matrices:
            raise AdapterError(f"{WEIGHTS_FILE} lacks the LoRA matrices of {name}, which target_modules names")
    patterns = {key: [(re.compile(rf"(.*\.)?({name})$"), value) for name, value in settings[key].items()]
                for key in ("rank_pattern", "alpha_pattern")}  # PEFT's matching, each key compiled once
    ranks, alphas = {}, {}
    for module, (rank_a, rank_b) in matrices.items():
        if not targeted(module, targets):
            raise AdapterError(f"{WEIGHTS_FILE} holds {module}, which is not among the target_modules of {CONFIG_FILE}")
        rank, alpha = (next((value for pattern, value in patterns[key] if pattern.match(module)), settings[default])
                       for key, default in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")))
        if rank_a != rank or rank_b != rank:
            raise AdapterError(f"{module}'s LoRA matrices have rank {rank_a} and {rank_b}, but {CONFIG_FILE} makes "
                               f"it {rank}")
        ranks.setdefault(rank, []).append(module)
        alphas.setdefault(alpha, []).append(module)
    r, alpha = settings["r"], settings["lora_alpha"]
    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=sorted(matrices), bias="none", use_rslora=settings["use_rslora"],
        # One pattern per value, of the exact names: PEFT matches every key against every layer it adapts.
        rank_pattern={exactly(modules): value for value, modules in ranks.items() if value != r},
        alpha_pattern={exactly(modules): value for value, modules in alphas.items() if value != alpha},
        # PiSSA, OLoRA, ... would rewrite the shared base weights: every matrix comes from the file instead.
        init_lora_weights=False, inference_mode=True,
        base_model_name_or_path=shorten(raw.get("base_model_name_or_path") or "", 200) or None)


def exactly(modules: list[str]) -> str:
    r"""A pattern that PEFT's `(.*\.)?(pattern)$` matches against these module names only."""
    return "|".join(re.escape(module) for module in sorted(modules))


def targeted_layers(targets, layers: dict[str, tuple[int, int] | None]) -> list[str]:
    """The layers target_modules names; refused if one may not be adapted (training refuses them too)."""
    targets = set(targets)
    found = [name for name in layers if targeted(name, targets)]
    for name in found:
        if not adaptable(name, layers):
            raise AdapterError(f"target_modules names {name}, which an adapter may not adapt here: {ADAPTABLE_TEXT}")
    return found


def targeted(name: str, targets: set[str]) -> bool:
    """Whether PEFT's list form of target_modules names the module `name` (the name itself or a dotted tail of it)."""
    parts = name.split(".")
    return any(".".join(parts[i:]) in targets for i in range(len(parts)))


ADAPTABLE_TEXT = ("only the Linear layers of the text model, of the cross-attention blocks, of the perceiver and of "
                  "the vision encoder (not lm_head nor the embeddings, which every request of a batch shares)")


def read_config(file: Path) -> dict:
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes (a LoRA config is about 1 kB)")
    try:
        raw = json.loads(file.read_text())
    except (ValueError, RecursionError, OSError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON ({shorten(exc, 100)})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{CONFIG_FILE} is not a JSON object")
    return raw


def checked_settings(raw: dict, max_rank: int) -> dict:
    """The settings of adapter_config.json, every key allowed and every value checked; missing ones at PEFT's."""
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"only LoRA adapters are supported, this one is {shorten(repr(raw.get('peft_type')), 40)}")
    for key, value in raw.items():
        if key not in (*CHECKED, *IGNORED, *METADATA) and not (key in DEFAULTS and value == DEFAULTS[key]):
            raise AdapterError(f"{CONFIG_FILE} sets {shorten(key, 60)}, which is not supported: only plain LoRA "
                               f"settings are ({', '.join(CHECKED[1:])}; any other only at PEFT's default)")
    for key, kinds in {**IGNORED, **METADATA}.items():
        if key in raw and not isinstance(raw[key], (*kinds, type(None))):
            raise AdapterError(f"{CONFIG_FILE}: {key} is a {type(raw[key]).__name__}")
    settings = {key: raw.get(key, _DEFAULTS[key]) for key in CHECKED}
    if settings["bias"] != "none":
        raise AdapterError(f"{CONFIG_FILE} sets bias={shorten(repr(settings['bias']), 40)}, which is not supported "
                           f"(only bias='none')")
    _rank("r", settings["r"], max_rank)
    _number("lora_alpha", settings["lora_alpha"])
    if not isinstance(settings["use_rslora"], bool):
        raise AdapterError(f"{CONFIG_FILE}: use_rslora must be true or false")
    targets = settings["target_modules"] or []
    if isinstance(targets, str):
        raise AdapterError(f"{CONFIG_FILE}: target_modules as a regular expression is not supported; list the module "
                           f"names (e.g. [\"q_proj\", \"v_proj\"])")
    if not isinstance(targets, list) or len(targets) > 10_000 or not all(
            isinstance(t, str) and _PLAIN_NAME.match(t) for t in targets):
        raise AdapterError(f"{CONFIG_FILE}: target_modules must be a list of module names")
    settings["target_modules"] = set(targets)
    for key, check in (("rank_pattern", lambda name, v: _rank(name, v, max_rank)), ("alpha_pattern", _number)):
        pattern = settings[key]
        if not isinstance(pattern, dict) or len(pattern) > MAX_PATTERN_KEYS:
            raise AdapterError(f"{CONFIG_FILE}: {key} must be an object of at most {MAX_PATTERN_KEYS} module names")
        for name, value in pattern.items():
            if not _PLAIN_NAME.match(name):  # PEFT matches these as regular expressions: no operators, no backtracking
                raise AdapterError(f"{CONFIG_FILE}: {key} key {shorten(repr(name), 60)} is not a module name")
            check(f"{key}[{name!r}]", value)
    return settings


def _rank(name: str, value, max_rank: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterError(f"{CONFIG_FILE}: {name} must be a positive integer, got {shorten(repr(value), 40)}")
    if value > max_rank:
        raise AdapterError(f"{CONFIG_FILE}: {name}={value} is over the limit of {max_rank} on a LoRA rank "
                           f"(IDEFICS_MAX_ADAPTER_RANK)")


def _number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_ALPHA <= value <= MAX_ALPHA:  # NaN
        raise AdapterError(f"{CONFIG_FILE}: {name} must be a finite number from {-MAX_ALPHA:g} to {MAX_ALPHA:g}, "
                           f"got {shorten(repr(value), 40)}")


def read_shapes(file: Path, layers: dict[str, tuple[int, int] | None]) -> dict[str, tuple[int, int]]:
    """Each module's (rank of A, rank of B), from the header alone: every tensor a float LoRA matrix that fits."""
    try:
        with open(file, "rb") as stream:
            head = stream.read(8)
    except OSError as exc:  # a directory of that name, say
        raise AdapterError(f"{WEIGHTS_FILE} cannot be read ({type(exc).__name__})") from None
    if len(head) < 8 or struct.unpack("<Q", head)[0] > MAX_HEADER_BYTES:
        raise AdapterError(f"{WEIGHTS_FILE} cannot be read (its header is missing or over {MAX_HEADER_BYTES} bytes)")
    try:
        with safe_open(file, "pt") as tensors:
            found = {key: (tensors.get_slice(key).get_dtype(), tuple(tensors.get_slice(key).get_shape()))
                     for key in tensors.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise AdapterError(f"{WEIGHTS_FILE} cannot be read ({shorten(exc, 100)})") from None
    if not found:
        raise AdapterError(f"{WEIGHTS_FILE} holds no tensors")
    matrices: dict[str, list] = {}
    for key, (dtype, shape) in found.items():
        module, part = lora_key(key)
        if module not in layers:
            raise AdapterError(f"targets {shorten(module)}, which the base model does not have (is it for another "
                               f"model?)")
        if not adaptable(module, layers):
            raise AdapterError(f"targets {shorten(module)}, which an adapter may not adapt here: {ADAPTABLE_TEXT}")
        in_features, out_features = layers[module]
        expected = in_features if part == "A" else out_features
        if len(shape) != 2 or (shape[1] if part == "A" else shape[0]) != expected:
            raise AdapterError(f"{shorten(key)} has shape {list(shape)}, which does not fit {module} "
                               f"({in_features} in, {out_features} out)")
        if dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{shorten(key)} holds {dtype} values; LoRA matrices are floats")
        ranks, index = matrices.setdefault(module, [None, None]), "AB".index(part)
        if ranks[index] is not None:
            raise AdapterError(f"{WEIGHTS_FILE} holds two lora_{part} matrices of {shorten(module)}")
        ranks[index] = shape[0] if part == "A" else shape[1]
    missing = [f"{module}.lora_{'AB'[ranks.index(None)]}" for module, ranks in matrices.items() if None in ranks]
    if missing:
        raise AdapterError(f"{WEIGHTS_FILE} lacks {len(missing)} of the {2 * len(matrices)} LoRA matrices of its "
                           f"modules (first: {missing[0]})")
    return {module: tuple(ranks) for module, ranks in matrices.items()}


BF16_EXPONENT = 0x7F80  # all ones: infinite or NaN
VALUES_AT_ONCE = 1 << 24


def check_values(path: Path) -> None:
    """Refuse matrices with NaN or infinite values (their requests got empty answers), read with numpy a slice at a
    time: no torch operation, so it runs off the torch thread (a second OpenMP team would slow every decode step)."""
    file = path / WEIGHTS_FILE
    with open(file, "rb") as stream:
        size = struct.unpack("<Q", stream.read(8))[0]
        header = json.loads(stream.read(size))
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + size)
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        bf16 = info["dtype"] == "BF16"
        values = data[start:end].view(np.uint16 if bf16 else NUMPY_DTYPES[info["dtype"]])
        for first in range(0, len(values), VALUES_AT_ONCE):
            piece = values[first:first + VALUES_AT_ONCE]
            if ((piece & BF16_EXPONENT) == BF16_EXPONENT).any() if bf16 else not np.isfinite(piece).all():
                raise AdapterError(f"{shorten(key)} holds values that are not finite (NaN or infinite)")


def lora_key(key: str) -> tuple[str, str]:
    """(module, "A" or "B") of a LoRA matrix's tensor name; anything else is refused."""
    match = _LORA_KEY.match(key) if len(key) <= 300 else None
    if not match:
        raise AdapterError(f"unsupported tensor {shorten(repr(key))} (only LoRA A/B matrices are loaded)")
    return match["module"], match["part"]


def with_safetensors(path: Path, weights_dir: Path) -> Path:
    """`path` itself, unless it holds an adapter_model.bin only: then `weights_dir/converted/<sha256>/` with its config
    and its tensors as safetensors, made once, atomically. The source folder is never written to."""
    if not (path / PICKLED_FILE).is_file() or (path / WEIGHTS_FILE).exists():
        return path  # check_adapter says what is wrong with anything else
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"not a PEFT adapter: {CONFIG_FILE} is missing")
    digest = hashlib.sha256((path / CONFIG_FILE).read_bytes())
    with open(path / PICKLED_FILE, "rb") as stream:
        hashlib.file_digest(stream, lambda: digest)  # the config's bytes, then the pickle's
    target = weights_dir / "converted" / digest.hexdigest()[:32]
    if target.is_dir():
        return target
    started = time.perf_counter()
    tensors = load_pickled_lora(path / PICKLED_FILE)
    try:
        _write_converted(path / CONFIG_FILE, tensors, target)
    except OSError:  # the details name server paths: for the log, not for the requester
        log.exception("%s could not be converted into %s", PICKLED_FILE, target.parent)
        raise AdapterError(f"{PICKLED_FILE} could not be converted (the server could not write it; see its log)"
                           ) from None
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
    storages, total = {}, 0
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise AdapterError(f"{PICKLED_FILE} is refused: entry {shorten(repr(key))} is a {type(value).__name__}, "
                               f"not a tensor")
        try:
            lora_key(key)
        except AdapterError as exc:
            raise AdapterError(f"{PICKLED_FILE} is refused: {exc}") from None
        # A pickle may view a one-element storage as a tensor of any size (stride 0): its copy below would be that
        # size. Each tensor must be 2-D, laid out in its storage, and all of them no larger than their storages.
        storage = value.untyped_storage()
        if value.dim() != 2 or not value.is_contiguous() or (
                storage.nbytes() < (value.storage_offset() + value.numel()) * value.element_size()):
            raise AdapterError(f"{PICKLED_FILE} is refused: {shorten(key)} is not a 2-D tensor laid out in its data")
        storages[storage.data_ptr()] = storage.nbytes()
        total += value.numel() * value.element_size()
    if total > sum(storages.values()):
        raise AdapterError(f"{PICKLED_FILE} is refused: its tensors are views larger than the data it holds")
    # Clones: safetensors refuses tensors that share memory (torch.save keeps views of one storage).
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def _unpickler_reason(exc: Exception) -> str:
    """The reason in torch's long message (which also suggests loading the file unsafely: not for our users)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. Please|\n|$)", text)
    return (found[1] if found else (text.strip().splitlines() or [type(exc).__name__])[0])[:300]
