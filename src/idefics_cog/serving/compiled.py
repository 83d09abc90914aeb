"""The decode step compiled: whether (decided once, at setup), and what CUDA graph trees need on the engine's thread."""

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
        return True, "IDEFICS_COMPILE=on" + ("" if base.device.type == "cuda" else " (inductor's CPU kernels, no CUDA graphs)")
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
