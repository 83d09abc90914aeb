"""A download's cancel: the request that wanted it went away, so it stops at once."""

import threading
from collections.abc import Callable
from contextlib import contextmanager

from idefics_cog.weights.base import WeightsError


class Cancelled(WeightsError):
    """The request that wanted the download went away (cancelled, disconnected): stopped, and not its source's fault."""


class Cancel:
    """Set by another thread to stop a download: checked between blocks, and it interrupts a read that is waiting
    for a slow server (urllib3's `HTTPResponse.shutdown`), so a cancelled request frees its thread at once."""

    def __init__(self):
        self._event, self._lock, self._interrupts = threading.Event(), threading.Lock(), []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            interrupts = list(self._interrupts)
        for interrupt in interrupts:
            try:
                interrupt()
            except Exception:  # noqa: BLE001 - a connection already closed: nothing left to interrupt
                pass

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)

    def check(self, what: str) -> None:
        if self._event.is_set():
            raise Cancelled(f"{what}: the request was cancelled; the download stopped")

    @contextmanager
    def interrupting(self, interrupt: Callable[[], None]):
        """Call `interrupt` if the cancel comes while the block runs."""
        with self._lock:
            self._interrupts.append(interrupt)
            cancelled = self._event.is_set()
        if cancelled:  # set between the last check and now: the read about to start is interrupted all the same
            interrupt()
        try:
            yield
        finally:
            with self._lock:
                self._interrupts.remove(interrupt)
