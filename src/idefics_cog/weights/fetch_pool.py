"""Downloads a stranger starts, kept from harming anyone else: on their own bounded pool of threads, one per source
however many requests want it, stopped when no request waits for it any more, and remembered in bounded maps."""

import concurrent.futures
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from idefics_cog.weights.stream import Cancel, Cancelled


@dataclass(eq=False)
class _Shared:
    """One fetch in flight, how many requests wait for it, and the fetch of its key being stopped before it."""

    before: "_Shared | None" = None
    cancel: Cancel = field(default_factory=Cancel)
    future: Future | None = None
    waiters: int = 0


@dataclass(frozen=True)
class Waiter:
    """One request's share of a fetch: its own future (cancelling it cancels nobody else's), and `leave`, to be
    called once the request no longer waits (done, failed or cancelled)."""

    future: Future
    leave: Callable[[], None]

    def result(self):  # for a caller that may block
        try:
            return self.future.result()
        finally:
            self.leave()


class FetchPool:
    """Runs `work(cancel)` for a key on at most `threads` threads of its own, so that no other work waits behind
    slow sources. Requests for a key share its fetch; when the last one leaves before it ends, its Cancel is set
    (the download stops at once) and a queued fetch never starts. Only fetches in flight are kept."""

    def __init__(self, threads: int, name: str = "fetch"):
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self.lock = threading.Lock()
        self.running: dict[Hashable, _Shared] = {}

    def join(self, key: Hashable, work: Callable[[Cancel], object]) -> Waiter:
        with self.lock:
            shared = self.running.get(key)
            if shared is None or shared.cancel.is_set():
                # A fetch being stopped still holds its files: the new one starts once it has ended.
                shared = self.running[key] = _Shared(before=shared)
                shared.future = self.executor.submit(self._run, key, shared, work)
            shared.waiters += 1
        mine: Future = Future()
        shared.future.add_done_callback(lambda done: _copy(done, mine))
        return Waiter(mine, lambda: self._leave(key, shared))

    def _run(self, key: Hashable, shared: _Shared, work: Callable[[Cancel], object]):
        try:
            while shared.before is not None:  # each fetch of the key before it, ended
                concurrent.futures.wait([shared.before.future])
                shared.before = shared.before.before
            shared.cancel.check(str(key)[:80])
            return work(shared.cancel)
        finally:
            with self.lock:
                if self.running.get(key) is shared:
                    del self.running[key]

    def _leave(self, key: Hashable, shared: _Shared) -> None:
        with self.lock:  # a request joining meanwhile sees the cancel, and starts a fetch of its own after this one
            shared.waiters -= 1
            if shared.waiters or shared.future.done():
                return
            shared.cancel.set()
            if shared.future.cancel() and self.running.get(key) is shared:  # never started: it never will
                self.running[key] = shared.before  # ... but the one it waited for may still run
                if shared.before is None or shared.before.future.done():
                    del self.running[key]


def _copy(source: Future, target: Future) -> None:
    try:  # InvalidStateError: the waiting request has cancelled `target` already
        if source.cancelled():
            target.set_exception(Cancelled("the request was cancelled; the download stopped"))
        elif source.exception() is not None:
            target.set_exception(source.exception())
        else:
            target.set_result(source.result())
    except concurrent.futures.InvalidStateError:
        pass


class Recent:
    """A map that holds at most `capacity` entries (the least recently put out first), each for at most `seconds`
    (None: until pushed out): what a server remembers of the sources strangers named stays bounded."""

    def __init__(self, capacity: int, seconds: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.capacity, self.seconds, self.clock = capacity, seconds, clock
        self.items: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Hashable, default=None):
        with self.lock:
            found = self.items.get(key)
            if found is None:
                return default
            if self.seconds is not None and self.clock() - found[0] >= self.seconds:
                del self.items[key]
                return default
            return found[1]

    def put(self, key: Hashable, value) -> None:
        with self.lock:
            now = self.clock()
            while self.items and self.seconds is not None and (  # expired ones go as new ones come (oldest first)
                    now - next(iter(self.items.values()))[0] >= self.seconds):
                self.items.popitem(last=False)
            self.items[key] = (now, value)
            self.items.move_to_end(key)
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)

    def pop(self, key: Hashable, default=None):
        with self.lock:
            found = self.items.pop(key, None)
        return default if found is None else found[1]

    def __len__(self) -> int:
        return len(self.items)
