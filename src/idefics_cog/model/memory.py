"""The fast path's KV cache: slots and tokens per slot, sized from the GPU memory left after loading."""

from dataclasses import dataclass

GiB = 1 << 30
ACTIVATIONS = 2 * GiB  # one long prompt's prefill activations and logits, the CUDA allocator's slack
DEFAULT_FRACTION = 0.9  # vLLM's default
MIN_CONTEXT = 1024  # below it, fewer slots rather than shorter ones
CONTEXT_STEP = 256  # the decode step's smallest length bucket


def image_tokens(config) -> int:
    """The perceiver's latents, or every patch."""
    if config.use_resampler:
        return config.perceiver_config.resampler_n_latents
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1


def slot_bytes(config, context_tokens: int, max_images: int, dtype_bytes: int) -> int:
    """With a spare column, where the compiled step's padding rows write."""
    cross_layers = config.num_hidden_layers // config.cross_layer_interval
    entries = config.num_hidden_layers * (context_tokens + 1) + cross_layers * max_images * image_tokens(config)
    return 2 * entries * config.hidden_size * dtype_bytes


def kv_cache_bytes(config, slots: int, max_images: int, dtype_bytes: int, context_tokens: int | None = None) -> int:
    return slots * slot_bytes(config, context_tokens or config.max_position_embeddings, max_images, dtype_bytes)


def minimum_kv_cache_bytes(config, max_images: int, dtype_bytes: int) -> int:
    """One slot of MIN_CONTEXT tokens: what placement.py reserves beside the weights."""
    return kv_cache_bytes(config, 1, max_images, dtype_bytes, min(MIN_CONTEXT, config.max_position_embeddings))


def usable_memory(free: int, total: int, fraction: float = DEFAULT_FRACTION) -> int:
    """Negative when more is in use than the fraction allows."""
    return int(fraction * total) - (total - free)


def kv_cache_budget(free: int, total: int, fraction: float = DEFAULT_FRACTION, reserve: int = ACTIVATIONS) -> int:
    return usable_memory(free, total, fraction) - reserve


@dataclass(frozen=True)
class KVCachePlan:
    slots: int  # requests decoded together; more wait
    context_tokens: int  # prompt + new tokens of one request
    bytes: int
    reason: str  # for the setup log

    def __str__(self) -> str:
        slots = f"{self.slots} slot{'s' * (self.slots != 1)}"
        return f"{slots} of {self.context_tokens} tokens ({self.bytes / GiB:.2f} GiB): {self.reason}"


def plan_kv_cache(config, max_batch: int, max_images: int, dtype_bytes: int, budget: int | None) -> KVCachePlan:
    """Preferably `max_batch` full slots, then `max_batch` shorter ones, then fewer slots of MIN_CONTEXT."""
    full = config.max_position_embeddings

    def plan(slots: int, context_tokens: int, reason: str) -> KVCachePlan:
        return KVCachePlan(slots, context_tokens,
                           kv_cache_bytes(config, slots, max_images, dtype_bytes, context_tokens), reason)

    if budget is None:
        return plan(max_batch, full, "no memory budget on this device (IDEFICS_MAX_BATCH slots of the full context)")
    shown = f"{max(budget, 0) / GiB:.2f} GiB for the cache"
    if kv_cache_bytes(config, max_batch, max_images, dtype_bytes) <= budget:
        return plan(max_batch, full, f"the full context for IDEFICS_MAX_BATCH={max_batch} requests fits {shown}")
    per_token = slot_bytes(config, 1, max_images, dtype_bytes) - slot_bytes(config, 0, max_images, dtype_bytes)
    room = budget // max_batch - slot_bytes(config, 0, max_images, dtype_bytes)
    context_tokens = min(full, room // per_token // CONTEXT_STEP * CONTEXT_STEP)
    floor = min(MIN_CONTEXT, full)
    if context_tokens >= floor:
        return plan(max_batch, context_tokens, f"{shown}: the context per request shortened from {full} tokens")
    slots = min(max_batch, max(budget, 0) // slot_bytes(config, floor, max_images, dtype_bytes))
    if slots < 1:
        need = slot_bytes(config, floor, max_images, dtype_bytes)
        raise ValueError(
            f"not enough GPU memory for the key/value cache: {shown} after loading the model, one request of "
            f"{floor} tokens needs {need / GiB:.2f} GiB; quantize (IDEFICS_QUANTIZATION), raise "
            f"IDEFICS_CACHE_MEMORY_FRACTION, lower IDEFICS_MAX_IMAGES, or use a larger GPU")
    return plan(slots, floor, f"{shown}: {slots} of IDEFICS_MAX_BATCH={max_batch} requests at once (the others "
                f"wait for a slot), with the context per request shortened from {full} tokens")
