"""A request's pieces as the plain generator coglet streams live, and the cancel that stops it.

coglet 0.23.1 streams the chunks of a plain generator returned by an async `predict` as they come (an async
generator's it collects until the end), iterating it on a thread of its own. But it cancels an async prediction
only with `future.cancel()` on the `concurrent.futures.Future` of `predict`'s coroutine, which has already finished
once `predict` returned the generator: that cancel changes nothing, and the generator would run to its end.
`install_cancel_hook` makes that call reach the stream: when `Future.cancel` is called on a finished future whose
result is a stream made here, the stream is stopped (the request leaves its batch within one decode step) and
raises Cog's `CancelationException`, which coglet reports as `canceled`. A client that drops its server-sent
events takes the same path. It relies on coglet's internals: tests/server/test_server_faults.py fails with a message
saying so if it no longer fires; then a cancelled request runs to its end, as it would without the hook.
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

# Each live generator handed to coglet, and its stream. Weak: a generator coglet has let go of is forgotten.
_streams: "weakref.WeakKeyDictionary[Iterator[str], _Stream]" = weakref.WeakKeyDictionary()


def live(pieces: AsyncIterator[str], first: Optional[str]) -> Iterator[str]:
    """`first`, then the rest of `pieces`, as a plain generator for coglet. Called on the event loop that runs
    `pieces`; each piece is then read there, in the caller's context (the prediction's logs stay its own).
    Closing the generator early, dropping it, or a cancel (see `install_cancel_hook`) closes `pieces`, which
    stops the request's generation."""
    stream = _Stream(pieces)
    generator = stream.iterate(first)
    _streams[generator] = stream
    return generator


class _Stream:
    def __init__(self, pieces: AsyncIterator[str]):
        self.pieces, self.loop = pieces, asyncio.get_running_loop()
        self.context, self.loop_thread = contextvars.copy_context(), threading.get_ident()
        # Read and written on the loop's thread only, so a cancel and the next read cannot miss each other.
        self.cancelled, self.reading = False, None  # reading: the task waiting for the next piece

    def cancel(self) -> None:
        """Stop the stream (from any thread): the piece being waited for, or else the next one, is never read."""
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
        return self.context.run(asyncio.run_coroutine_threadsafe, coroutine, self.loop)

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
                    log.info("cancelled after %d chunks: generation stopped", sent)
                    raise CancelationException("prediction cancelled") from None
        finally:
            # Stops the generation (a read cancelled in `pieces` has already ended it: then this does nothing).
            closed = self._on_loop(self.pieces.aclose())
            if threading.get_ident() != self.loop_thread:  # waiting on the loop's thread (a GC there) would block it
                closed.result()


_HOOKED = "_idefics_cancels_streams"  # marks the hooked Future.cancel


def install_cancel_hook() -> None:
    """Make `concurrent.futures.Future.cancel`, called on a finished future whose result is a generator made by
    `live`, cancel that stream (module docstring). Other futures behave exactly as before. Idempotent."""
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
    """Cancel the stream that `future` resolved to, if it is one of ours. Never raises: a cancel that cannot reach
    a stream leaves it running to its end, as without the hook."""
    try:
        if not future.done() or future.cancelled() or future.exception() is not None:
            return
        result = future.result()
        stream = _streams.get(result) if isinstance(result, types.GeneratorType) else None
        if stream is not None:
            stream.cancel()
    except Exception:  # noqa: BLE001 - the caller's cancel must go on whatever happens here
        log.exception("a cancel could not reach its stream; its generation runs to its end")
