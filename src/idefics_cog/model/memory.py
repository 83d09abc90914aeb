"""How many requests the fast engine's key/value cache holds, and how long a context each: sized from the memory
left once the model is loaded, as serving engines do (vLLM's `gpu_memory_utilization`), not fixed in advance.

The rule (`plan_cache`, a pure function of sizes, so that README's memory table and the tests compute it too):
the cache may use `fraction` of the GPU's total memory, minus what is already in use (the weights, CUDA itself,
other processes) and minus room for activations. In that budget it takes, in this order of preference,
1. `max_batch` slots of the model's full context;
2. `max_batch` slots of a shorter context (a multiple of 256 tokens, at least `MIN_CONTEXT`);
3. fewer slots of `MIN_CONTEXT` (the requests beyond them wait for a free slot);
and refuses to start when not even one slot of `MIN_CONTEXT` fits. On the CPU there is no budget (today's
behaviour: `max_batch` slots of the full context; a CPU is not where the real model is served).
"""

from dataclasses import dataclass

GiB = 1 << 30
ACTIVATIONS = 2 * GiB  # prefill activations and logits of one long prompt, the CUDA allocator's slack
DEFAULT_FRACTION = 0.9  # of the GPU's total memory for weights, cache and activations together (vLLM's default)
MIN_CONTEXT = 1024  # below it, fewer slots rather than shorter ones: a few images and a long answer still fit
CONTEXT_STEP = 256  # a shortened context is a multiple of the decode step's smallest length bucket


def image_tokens(config) -> int:
    """Key/value entries one image takes in a cross-attention block: the perceiver's latents, or every patch."""
    if config.use_resampler:
        return config.perceiver_config.resampler_n_latents
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1


def slot_bytes(config, context: int, max_images: int, dtype_bytes: int) -> int:
    """One slot: keys and values of every layer for `context` tokens and a spare column (the padding rows of a
    compiled decode step write there), and of every cross-attention block for `max_images` images."""
    cross_layers = config.num_hidden_layers // config.cross_layer_interval
    entries = config.num_hidden_layers * (context + 1) + cross_layers * max_images * image_tokens(config)
    return 2 * entries * config.hidden_size * dtype_bytes


def cache_bytes(config, slots: int, max_images: int, dtype_bytes: int, context: int | None = None) -> int:
    """The bytes a FastDecoder of `slots` slots of `context` tokens (default: the full context) allocates."""
    return slots * slot_bytes(config, context or config.max_position_embeddings, max_images, dtype_bytes)


def minimum_cache_bytes(config, max_images: int, dtype_bytes: int) -> int:
    """The least cache the fast engine starts with: one slot of MIN_CONTEXT (placement.py counts it as needed)."""
    return cache_bytes(config, 1, max_images, dtype_bytes, min(MIN_CONTEXT, config.max_position_embeddings))


def usable_memory(free: int, total: int, fraction: float = DEFAULT_FRACTION) -> int:
    """What a GPU with `free` of `total` bytes free offers this server: `fraction` of its total, less what is in use
    (negative when more is in use than the fraction allows). Placement decides with it before loading."""
    return int(fraction * total) - (total - free)


def cache_budget(free: int, total: int, fraction: float = DEFAULT_FRACTION, reserve: int = ACTIVATIONS) -> int:
    """Bytes the cache may take on a GPU with `free` of `total` bytes free after loading: what it offers
    (`usable_memory`), less `reserve` for activations."""
    return usable_memory(free, total, fraction) - reserve


@dataclass(frozen=True)
class CachePlan:
    slots: int  # requests decoded together; more wait
    context: int  # tokens per slot: prompt + new tokens of one request
    bytes: int  # what the cache allocates
    reason: str  # for the setup log

    def __str__(self) -> str:
        slots = f"{self.slots} slot{'s' * (self.slots != 1)}"
        return f"{slots} of {self.context} tokens ({self.bytes / GiB:.2f} GiB): {self.reason}"


def plan_cache(config, max_batch: int, max_images: int, dtype_bytes: int, budget: int | None) -> CachePlan:
    """The slots and context per slot for a budget of `budget` bytes (None: no limit). Raises ValueError, naming
    the numbers and what to change, when not even one slot of MIN_CONTEXT fits."""
    full = config.max_position_embeddings

    def plan(slots: int, context: int, reason: str) -> CachePlan:
        return CachePlan(slots, context, cache_bytes(config, slots, max_images, dtype_bytes, context), reason)

    if budget is None:
        return plan(max_batch, full, "no memory budget on this device (IDEFICS_MAX_BATCH slots of the full context)")
    shown = f"{max(budget, 0) / GiB:.2f} GiB for the cache"
    if cache_bytes(config, max_batch, max_images, dtype_bytes) <= budget:
        return plan(max_batch, full, f"the full context for IDEFICS_MAX_BATCH={max_batch} requests fits {shown}")
    per_token = slot_bytes(config, 1, max_images, dtype_bytes) - slot_bytes(config, 0, max_images, dtype_bytes)
    room = budget // max_batch - slot_bytes(config, 0, max_images, dtype_bytes)
    context = min(full, room // per_token // CONTEXT_STEP * CONTEXT_STEP)
    floor = min(MIN_CONTEXT, full)
    if context >= floor:
        return plan(max_batch, context, f"{shown}: the context per request shortened from {full} tokens")
    slots = min(max_batch, max(budget, 0) // slot_bytes(config, floor, max_images, dtype_bytes))
    if slots < 1:
        need = slot_bytes(config, floor, max_images, dtype_bytes)
        raise ValueError(
            f"not enough GPU memory for the key/value cache: {shown} after loading the model, one request of "
            f"{floor} tokens needs {need / GiB:.2f} GiB; quantize (IDEFICS_QUANTIZATION), raise "
            f"IDEFICS_CACHE_MEMORY_FRACTION, lower IDEFICS_MAX_IMAGES, or use a larger GPU")
    return plan(slots, floor, f"{shown}: {slots} of IDEFICS_MAX_BATCH={max_batch} requests at once (the others "
                f"wait for a slot), with the context per request shortened from {full} tokens")
