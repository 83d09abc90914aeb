"""The decode step compiled: whether (decided once, at setup), its settings, the few shapes it runs at, and what CUDA
graph trees need on the engine's thread."""

import threading
from collections import defaultdict
from dataclasses import dataclass

import torch


def compile_decision(base, setting: str | bool) -> tuple[bool, str]:
    """Whether the decode step runs compiled (IDEFICS_COMPILE: auto, on, off), and why: decided once, at setup."""
    setting = {True: "on", False: "off"}.get(setting, setting)
    if setting == "off":
        return False, "IDEFICS_COMPILE=off"
    quantized = sorted({type(m).__name__ for m in base.modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit")})
    if quantized:
        return False, f"bitsandbytes layers ({', '.join(quantized)}) cannot be captured in one graph"
    if setting == "on":
        return True, "IDEFICS_COMPILE=on" + ("" if base.device.type == "cuda" else
                                             " (inductor's CPU kernels, no CUDA graphs)")
    if base.device.type == "cuda":
        return True, "CUDA: one graph per step, captured once per batch and length bucket (torch.compile, CUDA graphs)"
    return False, f"IDEFICS_COMPILE=auto compiles on CUDA only, this is {base.device.type}"


def compile_step(step, device: torch.device, backend, static: tuple):
    """`step` compiled into one graph (fullgraph: a graph break is an error, not a second graph); on CUDA with
    inductor, captured as CUDA graphs (reduce-overhead). `static`: the tensors it reads and writes in place, whose
    addresses never change."""
    for tensor in static:
        torch._dynamo.mark_static_address(tensor)
    # Each decoder compiles its own graphs (guarded on it): room for a few in one process (tests), and past that an
    # error, never torch's quiet fallback to running the step uncompiled.
    torch.compiler.config.recompile_limit = max(torch.compiler.config.recompile_limit, 64)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    cuda_graphs = device.type == "cuda" and backend == "inductor"
    return torch.compile(step, fullgraph=True, backend=backend, mode="reduce-overhead" if cuda_graphs else None)


# ---- the shapes a compiled step runs: few, so that few CUDA graphs are ever recorded ----

def batch_bucket(count: int, max_batch: int) -> int:
    """The batch padded to a power of two, at least 2 (a batch of 1 would be a graph of its own: torch specializes
    size 1); padding rows sit in free slots and write their spare column."""
    return min(max_batch, max(2, 1 << (count - 1).bit_length()))


def length_bucket(length: int, max_len: int) -> int:
    """The attended cache length rounded up to a power of two from 256 (reading all 2048 columns at every step would
    cost a 9b 6% more per token)."""
    return min(max_len, max(256, 1 << (length - 1).bit_length()))


def buckets(max_batch: int, max_len: int) -> list[tuple[int, int]]:
    """Every (batch, length) a step of up to `max_batch` rows and `max_len` columns runs at."""
    batches = sorted({batch_bucket(count, max_batch) for count in range(1, max_batch + 1)})
    lengths = sorted({length_bucket(length, max_len) for length in range(1, max_len + 1, 128)}
                     | {length_bucket(max_len, max_len)})
    return [(batch, length) for length in lengths for batch in batches]


def cuda_graphs_on_this_thread() -> None:
    """Let CUDA graph trees (torch.compile's reduce-overhead mode) run on the engine's own thread. They keep their
    state per thread and set it up only in the thread that imported them (and in autograd's); on any other thread
    their first replay fails an assertion (seen on an H200, torch 2.11). This gives this thread that state. The
    pinned torch 2.13 sets it up itself on any thread (cudagraph_trees.get_obj), so there this does nothing; it stays
    for the GPU machines' own older torch that bench/gpu.sh runs on (private torch names: skipped when absent)."""
    try:
        from torch._inductor.cudagraph_trees import local
    except (ImportError, AttributeError):
        return
    if not hasattr(local, "tree_manager_containers"):
        local.tree_manager_containers = {}
        local.tree_manager_locks = defaultdict(threading.Lock)


@dataclass
class Step:
    """A decode step's result for its rows: float32 logits (banned ids at -inf) and their argmax, on the device."""

    logits: torch.Tensor
    tokens: torch.Tensor


@dataclass
class WarmUp:
    shapes: int  # batch x length buckets run
    graphs: int  # graphs compiled
    seconds: float
