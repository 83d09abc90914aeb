"""A request's text pieces as the plain generator coglet streams live, and the cancel that stops it.

coglet 0.23.1 streams only a plain generator live, and cancels an async prediction with `Future.cancel()` on the
already finished future of `predict`'s coroutine, which would change nothing: `install_cancel_hook` routes that call
to the stream (relies on coglet internals; tests/server/test_predict_faults.py says so if it stops firing).
"""

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import threading
import types
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Optional

from cog import CancelationException

log = logging.getLogger(__name__)

# Weak: a generator coglet has let go of is forgotten.
_streams: "weakref.WeakKeyDictionary[Iterator[str], _Stream]" = weakref.WeakKeyDictionary()


def live(pieces: AsyncIterator[str], first: Optional[str]) -> Iterator[str]:
    """`first`, then the rest of `pieces`, read on the calling event loop in the caller's contextvars. Closing,
    dropping or cancelling the generator closes `pieces`, which stops the generation."""
    stream = _Stream(pieces)
    generator = stream.iterate(first)
    _streams[generator] = stream
    return generator


class _Stream:
    def __init__(self, pieces: AsyncIterator[str]):
        self.pieces, self.loop = pieces, asyncio.get_running_loop()
        self.request_context, self.loop_thread = contextvars.copy_context(), threading.get_ident()
        # Loop's thread only, so a cancel and the next read cannot miss each other.
        self.cancelled, self.reading = False, None  # reading: the task waiting for the next piece

    def cancel(self) -> None:
        """From any thread: the piece being waited for, or else the next one, is never read."""
        self.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        self.cancelled = True
        if self.reading is not None:
            self.reading.cancel()  # CancelledError in `pieces`, whose generation then stops

    async def _next(self) -> Optional[str]:
        if self.cancelled:
            raise asyncio.CancelledError
        self.reading = asyncio.current_task()
        try:
            return await anext(self.pieces, None)
        finally:
            self.reading = None

    def _on_loop(self, coroutine) -> concurrent.futures.Future:
        return self.request_context.run(asyncio.run_coroutine_threadsafe, coroutine, self.loop)

    def iterate(self, first: Optional[str]) -> Iterator[str]:
        sent = 0
        try:
            piece = first
            while piece is not None:
                yield piece
                sent += 1
                try:
                    piece = self._on_loop(self._next()).result()
                except concurrent.futures.CancelledError:
                    log.info("cancelled after %d pieces: generation stopped", sent)
                    raise CancelationException("prediction cancelled") from None
        finally:
            # A no-op when a cancelled read has already ended the generation.
            closed = self._on_loop(self.pieces.aclose())
            if threading.get_ident() != self.loop_thread:  # waiting on the loop's thread (a GC there) would block it
                closed.result()


_HOOKED = "_idefics_cancels_streams"  # marks the hooked Future.cancel


def install_cancel_hook() -> None:
    """`Future.cancel` on a finished future whose result came from `live` cancels that stream; idempotent."""
    original = concurrent.futures.Future.cancel
    if getattr(original, _HOOKED, False):
        return

    @functools.wraps(original)
    def cancel(future: concurrent.futures.Future) -> bool:
        cancelled = original(future)
        if not cancelled:
            _cancel_stream_of(future)
        return cancelled

    setattr(cancel, _HOOKED, True)
    concurrent.futures.Future.cancel = cancel


def hook_installed() -> bool:
    return getattr(concurrent.futures.Future.cancel, _HOOKED, False)


def _cancel_stream_of(future: concurrent.futures.Future) -> None:
    """Never raises: a cancel that cannot reach its stream leaves it running to its end, as without the hook."""
    try:
        if not future.done() or future.cancelled() or future.exception() is not None:
            return
        result = future.result()
        stream = _streams.get(result) if isinstance(result, types.GeneratorType) else None
        if stream is not None:
            stream.cancel()
    except Exception:  # noqa: BLE001 - the caller's cancel must go on whatever happens here
        log.exception("a cancel could not reach its stream; its generation runs to its end")
