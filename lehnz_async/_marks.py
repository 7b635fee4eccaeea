"""Delivery receipts: what became of the events tracked before a mark.

Events leave the queue in the order they were tracked, and the ledger numbers them as
they do (their *queue sequence number*: events re-sent from the spool are not numbered,
they were tracked by an earlier tracker). `Tracker.mark()` closes a *window*: the numbers
from the end of the previous window (or 0) to the number the next event to be tracked
will get. Every event of a window is settled exactly once, by one of the ledger's writes
(`Ledger.settle` for a batch, whose first number `Batch.seq` and size say which of its
events fall in which window; `fail_taken` and `drop` for events that never became part of
a batch), and the window counts it by its fate. Events refused at the door (a full queue
under ``drop_newest``, tracked after close) take no number: they are counted in the
window that was open when they were refused.

A window is done when it has counted all its events, and, if some were spooled, once the
spool has written them (a worker that acknowledges "spooled" needs them on disk). Its
`Receipt` is then fixed. The window not closed yet counts too (what settles before its mark is taken
belongs to it): a few additions per batch, whether or not ``mark()`` is ever called.

A window's end also ends a batch: the flusher never cuts one across it
(`Ledger.window_room`), so that each batch, and each event taken off the queue with it
(failed in ``before_send``, unencodable, dropped), belongs to one window, and the counts
are exact. Marks a batch apart cost nothing; marks every few events make small batches.

All writes happen under the ledger's lock; waiting happens on the caller's own loop
(or thread, for `Mark.settled_sync`), so a mark can be awaited from any loop or thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from . import _gevent

if TYPE_CHECKING:
    from ._batch import Batch

#: Indexes into a window's counts, one per fate.
DELIVERED, FAILED, DROPPED, SPOOLED, UNSENT, FILTERED = range(6)


class Receipt(NamedTuple):
    """What became of the events of one window (see `Tracker.mark`).

    ``events == delivered + failed + dropped + filtered + spooled + unsent``.
    """

    #: Events tracked in the window.
    events: int
    #: Acknowledged by the server with a 2xx.
    delivered: int
    #: Reported to ``on_error`` for good: rejected (4xx), out of retries, unencodable,
    #: or failed in a hook. Sending them again would not help.
    failed: int
    #: Counted as dropped, with a reason (a full buffer, ``max_event_age``): lost.
    dropped: int
    #: Dropped on purpose: ``before_send`` returned None for them.
    filtered: int
    #: Written to the spool (and on disk): a tracker re-sends them when it next starts.
    spooled: int
    #: Given up at close before the server acknowledged them (`ShutdownError`, also
    #: reported to ``on_error``): they may or may not have been stored.
    unsent: int

    @property
    def ok_to_ack(self) -> bool:
        """Whether Lehnz has taken every event of the window: delivered, on disk in the
        spool, or failed for good. A worker acknowledges its source messages only then;
        otherwise it leaves them to be delivered to it again (``dropped`` or ``unsent``
        events: lost, or not known to be stored)."""
        return self.dropped == 0 and self.unsent == 0


class Window:
    """The events numbered ``lo`` to ``hi`` (excluded), and the door's events of its time."""

    __slots__ = ("_lock", "_waiters", "counts", "door", "hi", "lo", "receipt")

    def __init__(self, lo: int, hi: int, door: list[int]) -> None:
        self.lo = lo
        self.hi = hi
        #: events refused at the door while the window was open: [dropped, unsent]
        self.door = door
        #: numbered events settled so far, by fate (see DELIVERED...)
        self.counts = [0, 0, 0, 0, 0, 0]
        #: set once done; never changes after
        self.receipt: Receipt | None = None
        self._waiters: list[Callable[[Receipt], None]] = []
        self._lock = threading.Lock()

    @property
    def counted(self) -> int:
        return sum(self.counts)

    def resolve(self) -> None:
        """Fix the receipt and wake whoever waits (called outside the ledger's lock)."""
        delivered, failed, dropped, spooled, unsent, filtered = self.counts
        door_dropped, door_unsent = self.door
        receipt = Receipt(
            events=self.hi - self.lo + door_dropped + door_unsent,
            delivered=delivered,
            failed=failed,
            dropped=dropped + door_dropped,
            filtered=filtered,
            spooled=spooled,
            unsent=unsent + door_unsent,
        )
        with self._lock:
            self.receipt = receipt
            waiters, self._waiters = self._waiters, []
        for wake in waiters:
            wake(receipt)

    def on_done(self, wake: Callable[[Receipt], None]) -> None:
        """Call ``wake(receipt)`` once the window is done (at once if it is)."""
        with self._lock:
            receipt = self.receipt
            if receipt is None:
                self._waiters.append(wake)
                return
        wake(receipt)


class Windows:
    """A tracker's windows that are not done yet, oldest first. Written only under the
    ledger's lock (`Ledger`)."""

    def __init__(self) -> None:
        self.pending: list[Window] = []
        #: windows closed so far
        self.closed = 0
        self._lo = 0
        #: events refused at the door so far: [dropped, unsent]
        self._door = [0, 0]
        self._door_closed = [0, 0]  # ...up to the end of the last window
        # events of the open window (numbered from the end of the last one) settled so
        # far: they become the counts of the window that mark() closes next
        self._open = [0, 0, 0, 0, 0, 0]

    def close(self, hi: int) -> Window:
        """End the open window at queue number ``hi``; it is pending until done."""
        door = [now - then for now, then in zip(self._door, self._door_closed, strict=True)]
        self._door_closed = list(self._door)
        window = Window(self._lo, max(hi, self._lo), door)
        window.counts, self._open = self._open, [0, 0, 0, 0, 0, 0]
        self._lo = window.hi
        self.closed += 1
        self.pending.append(window)
        return window

    def door(self, n: int, unsent: bool) -> None:
        """``n`` events refused at the door (dropped, or unsent if tracked after close)."""
        self._door[1 if unsent else 0] += n

    def count(self, seq: int, n: int, fate: int, sign: int = 1) -> None:
        """Events ``seq`` to ``seq + n`` (excluded) settled as ``fate`` (``sign`` -1:
        they are not, after all)."""
        end = seq + n
        for window in self.pending:
            if window.lo >= end:
                break
            overlap = min(end, window.hi) - max(seq, window.lo)
            if overlap > 0:
                window.counts[fate] += sign * overlap
        later = end - max(seq, self._lo)
        if later > 0:
            self._open[fate] += sign * later

    def unspool(self, batches: list[Batch]) -> None:
        """These batches, counted as spooled, could not be written: they failed."""
        for batch in batches:
            if batch.seq >= 0:
                self.count(batch.seq, batch.n, SPOOLED, -1)
                self.count(batch.seq, batch.n, FAILED)

    def done(self, spool_dirty: bool) -> list[Window]:
        """Take the windows that are done, oldest first (a window that holds spooled
        events waits for the spool's next commit while it has anything unwritten)."""
        finished = [
            w
            for w in self.pending
            if w.counted >= w.hi - w.lo and not (spool_dirty and w.counts[SPOOLED])
        ]
        if finished:
            self.pending = [w for w in self.pending if w not in finished]
        return finished


def wait_async(window: Window) -> asyncio.Future[Receipt]:
    """A future, of the running loop, resolved with the window's receipt."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Receipt] = loop.create_future()

    def wake(receipt: Receipt) -> None:
        def deliver() -> None:
            if not future.done():
                future.set_result(receipt)

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            deliver()
        else:
            with contextlib.suppress(RuntimeError):  # the waiting loop is closed: none waits
                loop.call_soon_threadsafe(deliver)

    window.on_done(wake)
    return future


def wait_blocking(window: Window, timeout: float | None) -> Receipt | None:
    """Block this thread (or greenlet) until the window is done; None after
    ``timeout`` seconds."""
    future: concurrent.futures.Future[Receipt] = concurrent.futures.Future()
    window.on_done(future.set_result)
    try:
        if _gevent.threading_patched():
            return _gevent.wait(future, timeout)  # the hub runs meanwhile
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        return None


class Mark:
    """A point in a tracker's stream of events: the end of the window of events tracked
    since the previous mark (or ``flush()``) of the same tracker, or since it started.
    Made by `Tracker.mark`; waiting on it forces nothing: its events go in batches as
    full as ever.
    """

    __slots__ = ("_start", "_window")

    def __init__(self, window: Window, start: Callable[[bool], None]) -> None:
        self._window = window
        # starts the tracker if need be (events only settle once it runs); with True,
        # raises BlockingCallError on the tracker's own loop, where blocking would hang
        self._start = start

    @property
    def events(self) -> int:
        """Events tracked in the window (so far counted: refusals at the door are added
        when they happen)."""
        return self._window.hi - self._window.lo + sum(self._window.door)

    @property
    def done(self) -> bool:
        """Whether every event of the window is settled (`settled` returns at once)."""
        return self._window.receipt is not None

    async def settled(self, timeout: float | None = None) -> Receipt:
        """Wait until every event of the window is settled, and say what became of them.

        Raises:
            TimeoutError: not all settled within ``timeout`` seconds; nothing is given up,
                and the mark can be awaited again.
        """
        window = self._window
        if window.receipt is not None:
            return window.receipt
        self._start(False)
        future = wait_async(window)
        if timeout is None:
            return await future
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(self._late(timeout)) from None

    def settled_sync(self, timeout: float | None = None) -> Receipt:
        """The blocking form of `settled`, for code that runs no event loop (any thread
        but the tracker's loop).

        Raises:
            TimeoutError: not all settled within ``timeout`` seconds.
            BlockingCallError: called on the loop that runs the tracker.
        """
        window = self._window
        if window.receipt is not None:
            return window.receipt
        self._start(True)
        receipt = wait_blocking(window, timeout)
        if receipt is None:
            raise TimeoutError(self._late(timeout))
        return receipt

    def _late(self, timeout: float | None) -> str:
        window = self._window
        return (
            f"the mark's {self.events} event(s) did not all settle within {timeout} s "
            f"({window.counted} of {window.hi - window.lo} sent ones settled so far)"
        )

    def __repr__(self) -> str:
        state = "settled" if self.done else "pending"
        return f"<Mark {state} events={self.events} receipt={self._window.receipt}>"
