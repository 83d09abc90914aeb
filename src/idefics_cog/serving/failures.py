"""A request's failure stays its own (named by the stage that failed); an error that leaves the device unusable
ends the worker."""

import logging
import os
import sys
import time

import torch

from idefics_cog.errors import WeightsError

log = logging.getLogger(__name__)

DEVICE_LOST_EXIT = 70  # the worker's exit status when the device is unusable
EXIT_GRACE_S = 1.0  # for the last log line to be sent


class GenerationError(RuntimeError):
    """The server's error while generating one request's answer."""


def out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


def device_lost(exc: BaseException) -> bool:
    """CUDA's sticky errors; an out-of-memory error concerns only the request that asked for the memory."""
    if out_of_memory(exc):
        return False
    return isinstance(exc, torch.AcceleratorError) or isinstance(exc, RuntimeError) and any(
        marker in str(exc) for marker in ("device-side assert", "illegal memory access", "CUDA error"))


def exit_worker(exc: BaseException) -> None:
    """coglet then reports the server UNHEALTHY and the platform restarts it."""
    log.critical("the device is unusable after %s: %s; ending the worker process", type(exc).__name__, exc)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    time.sleep(EXIT_GRACE_S)  # coglet forwards the worker's logs from a thread of this process
    os._exit(DEVICE_LOST_EXIT)


def explained(exc: Exception) -> bool:
    """Errors that already tell the client what was wrong with its request."""
    return isinstance(exc, (ValueError, WeightsError)) and not device_lost(exc)


def failure(stage: str, exc: Exception) -> Exception:
    if device_lost(exc):
        exit_worker(exc)
    if out_of_memory(exc):
        error = GenerationError(f"out of memory while {stage}; the request was stopped and its memory freed "
                                f"(other requests were not affected): retry, or send a shorter prompt, fewer "
                                f"images or a lower max_new_tokens")
    else:
        error = GenerationError(f"{stage} failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
