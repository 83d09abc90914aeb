"""The adapters' fetch pool and the bounded maps of what a server remembers of strangers' sources."""

import threading
import time

import pytest

from idefics_cog.weights.fetch_pool import FetchPool, Recent
from idefics_cog.weights.stream import Cancelled


def blocking(started: threading.Event, release: threading.Event, calls: list):
    def work(cancel):
        calls.append(cancel)
        started.set()
        while not release.is_set():
            cancel.check("work")  # a download checks between blocks
            time.sleep(0.01)
        return "done"
    return work


def test_requests_for_one_key_share_one_fetch():
    pool, started, release, calls = FetchPool(2), threading.Event(), threading.Event(), []
    waiters = [pool.join("a", blocking(started, release, calls)) for _ in range(5)]
    started.wait(5)
    release.set()
    assert [w.result() for w in waiters] == ["done"] * 5 and len(calls) == 1
    assert pool.running == {}  # nothing kept once it ended


def test_a_fetch_nobody_waits_for_stops_and_a_queued_one_never_starts():
    pool, started, release, calls = FetchPool(1), threading.Event(), threading.Event(), []
    first = pool.join("a", blocking(started, release, calls))
    started.wait(5)
    queued = pool.join("b", blocking(threading.Event(), release, calls))
    queued.leave()  # its request was cancelled while it waited for the thread
    second = pool.join("a", lambda cancel: "again")  # the same source, wanted again while its fetch runs
    first.leave()  # its first request goes away: the second one still waits, so it goes on
    assert not calls[0].is_set()
    second.leave()
    assert calls[0].is_set()  # nobody waits any more: stopped
    with pytest.raises(Cancelled):
        first.future.result(5)
    assert len(calls) == 1  # "b" never ran
    assert pool.join("a", lambda cancel: "fresh").result() == "fresh"  # a new request starts afresh


def test_cancelling_one_waiters_future_cancels_nobody_else():
    pool, started, release, calls = FetchPool(1), threading.Event(), threading.Event(), []
    one, two = pool.join("a", blocking(started, release, calls)), pool.join("a", blocking(started, release, calls))
    started.wait(5)
    one.future.cancel()
    one.leave()
    release.set()
    assert two.result() == "done"


def test_recent_holds_at_most_its_capacity_and_forgets_expired_entries():
    now = [0.0]
    recent = Recent(3, seconds=10, clock=lambda: now[0])
    for key in "abcd":
        recent.put(key, key.upper())
    assert len(recent) == 3 and recent.get("a") is None and recent.get("d") == "D"
    now[0] = 10.0
    assert recent.get("b") is None  # expired
    recent.put("e", "E")  # expired ones go as new ones come
    assert len(recent) == 1 and recent.pop("e") == "E" and recent.pop("e") is None


@pytest.mark.slow
def test_a_key_never_has_two_fetches_at_once():
    """A fetch waiting for its key's stopping one, cancelled before it starts, leaves the stopping one in place: the
    next request's fetch still waits for it (both would fill the same cache folder)."""
    pool = FetchPool(3)
    running, lock, most = [0], threading.Lock(), [0]

    def counted(cancel):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.3)  # a download that takes a moment to notice its cancel
        finally:
            with lock:
                running[0] -= 1

    first = pool.join("k", counted)
    time.sleep(0.05)
    first.leave()  # stopping, still running
    second = pool.join("k", counted)  # waits for the first
    second.leave()  # cancelled before it started
    third = pool.join("k", counted)
    third.result()
    assert most[0] == 1


def test_a_cancel_set_before_the_read_starts_interrupts_it():
    from idefics_cog.weights.stream import Cancel

    cancel, interrupted = Cancel(), []
    cancel.set()
    with cancel.interrupting(lambda: interrupted.append(True)):
        pass
    assert interrupted == [True]
