"""The ledger: the only writer of a tracker's counters, and the one place a batch's fate
is settled.

Every event a tracker accepts ends in exactly one of: delivered, failed (reported to
``on_error``), dropped (counted, with a reason), or spooled. `Ledger.settle` is where a
`Batch` gets its fate, exactly once (``Batch.settled``); `refuse`, `fail_taken` and
`drop` account for events that never became part of a batch. Every write keeps the
identity ``taken + discarded == delivered + failed + dropped + in_flight + spooled``
(and so ``tracked == delivered + failed + dropped + queued + in_flight + spooled``, with
``tracked`` derived as ``taken + queued + discarded``) and happens under one lock, so a
`Stats` snapshot taken from any thread adds up.

The ledger also knows which batches are open, by the sequence number of their first
event, so that ``flush()`` can wait for exactly what it covers (`wait_settled`), and
counts what settles into the windows of ``mark()`` (`_marks`). Its dealings with the
spool are in `_spooling`, its reports to the user in `_reports` (two mixins: one state,
one lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ._backlog import Backlog
from ._batch import Fate
from ._exceptions import DeliveryError, ShutdownError
from ._marks import DELIVERED, DROPPED, FAILED, FILTERED, SPOOLED, UNSENT, Window, Windows
from ._reports import (
    NEVER_SENT_AT_CLOSE,
    SLOW_HOOK,
    UNSENT_AT_CLOSE,
    Reporting,
    close_deadline_error,
)
from ._spooling import Spooling
from ._stats import Stats

if TYPE_CHECKING:
    from ._batch import Batch
    from ._event import Event
    from ._spool import Spool

logger = logging.getLogger("lehnz_async")

__all__ = [  # what other modules import from here (some defined in the halves)
    "NEVER_SENT_AT_CLOSE",
    "SLOW_HOOK",
    "UNSENT_AT_CLOSE",
    "Fate",
    "Ledger",
    "close_deadline_error",
]


class Ledger(Spooling, Reporting):
    """The counters, the open batches and the failure reports of one tracker.

    Args:
        on_error: The user's callback for each `DeliveryError`, or None.
        spool: Where given-up batches go, if anywhere.
    """

    def __init__(
        self,
        on_error: Callable[[DeliveryError], object] | None,
        spool: Spool | None,
    ) -> None:
        self._lock = threading.Lock()
        self._on_error = on_error
        self.spool = spool
        self.taken = 0  # events that left the queue (into batches, or failed/dropped there)
        self.discarded = 0  # events failed or dropped without ever being queued
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.in_flight = 0
        self.spooled = 0
        self.batches = 0
        self.requests = 0
        self.retries = 0
        #: dropped events by reason
        self.drops: dict[str, int] = {}
        #: bytes held in memory by open batches (see `memory_size`); spilled ones hold none
        self.held_bytes = 0
        #: outages so far, and whether one is under way
        self.outages = 0
        self.in_outage = False
        #: requests started and not yet ended
        self.requests_in_flight = 0
        #: called with (seconds, status or None, failure or None) as each request ends
        self.request_observers: list[Callable[[float, int | None, str | None], object]] = []
        #: settle() calls for a batch already settled: a bug if ever non-zero
        self.anomalies = 0
        # root sequence number -> [events still unsettled, spool row or None]; in
        # insertion order, which is sequence order, so the first key is the oldest
        self._open: dict[int, list[int | None]] = {}
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._reported_kinds: set[tuple[type, int | None]] = set()
        self._spool_logged = False
        # (events, why) given up to the spool since the last commit: logged once written
        self._spooled_reasons: list[tuple[int, str]] = []
        #: every batch opened and not settled yet: its one owner
        self.backlog = Backlog()
        #: why the spool was set aside, if it was (see `spool_failed`)
        self.spool_error = ""
        #: False once a write to the spool failed (a full disk): nothing more is written
        #: there, but what it holds is still read back and removed
        self.spool_writable = True
        #: bugs caught and survived (see `internal_error`)
        self.internal_errors = 0
        self._internal_logged: set[tuple[str, type]] = set()
        self._slow_hooks: set[str] = set()
        #: the endpoint, named in every delivery error
        self.endpoint = ""
        #: events re-sent from the spool (numbered in ``taken``, not in the queue's order)
        self.replayed = 0
        #: parts of the engine taking events off the queue right now, not yet counted
        #: here (`moving`): a window's end is read only while it is 0
        self.movers = 0
        #: the windows of mark() and flush() not done yet (see `_marks`)
        self.windows = Windows()
        #: time.monotonic() of the last 2xx answer, or None
        self.last_ok: float | None = None
        #: (time.monotonic(), what) of the last event failed or dropped, or None
        self.last_loss: tuple[float, str] | None = None
        #: the user's hook running now ("on_error"), for the watchdog
        self.hook_running = ""
        # set while on_error runs in some thread: it is never re-entered from itself
        self._in_on_error = threading.local()

    def reset(self) -> None:
        """Start from zero (in a forked child: the parent accounts for its events)."""
        observers, endpoint = self.request_observers, self.endpoint
        self.__init__(self._on_error, self.spool)  # type: ignore[misc]
        self.request_observers, self.endpoint = observers, endpoint

    # -- writes ---------------------------------------------------------------------------

    def open(self, batch: Batch, spool_id: int | None = None) -> None:
        """Count ``batch`` (just cut, or read back from the spool) as taken and in flight,
        and give it its sequence number."""
        n = batch.n
        with self._lock:
            batch.root = self.taken
            if spool_id is None:
                batch.seq = self.taken - self.replayed
            else:
                self.replayed += n  # tracked by an earlier tracker: in no window
            self.taken += n
            self.in_flight += n
            self.batches += 1
            self.held_bytes += batch.mem
            self._open[batch.root] = [n, spool_id]
            self.backlog.add(batch)

    def settle(
        self,
        batch: Batch,
        fate: Fate,
        error: DeliveryError | None = None,
        reason: str = "",
    ) -> None:
        """Decide ``batch``'s fate; the only place that does. ``error`` goes with FAILED
        (reported to on_error) and SPOOLED (logged); ``reason`` with DROPPED."""
        n = batch.n
        spilled = batch.spill_row is not None
        with self._lock:
            if batch.settled:
                self.anomalies += 1
                anomaly = True
            else:
                anomaly = False
                batch.settled = True
                self.backlog.discard(batch)
                self.in_flight -= n
                self.held_bytes -= batch.mem
                if fate is Fate.DELIVERED:
                    self.delivered += n
                elif fate is Fate.SPOOLED:
                    self.spooled += n
                    if not spilled:
                        # queued for the spool's next commit under the lock that counts
                        # it in a window: a window with spooled events waits for that
                        # commit (`Windows.done`), and must never see it counted first
                        assert self.spool is not None
                        self.spool.add(batch)
                elif fate is Fate.DROPPED:
                    self.dropped += n
                    self.drops[reason] = self.drops.get(reason, 0) + n
                else:
                    self.failed += n
                if batch.seq >= 0:
                    self.windows.count(batch.seq, n, _fate_index(fate, error))
                entry = self._open[batch.root]
                if fate is Fate.SPOOLED and spilled and entry[1] == batch.spill_row:
                    entry[1] = None  # a replayed row, spooled again as it is: it stays
                remaining = entry[0]
                assert remaining is not None
                entry[0] = remaining - n
                closed_row = entry[1] if entry[0] == 0 else None
                if entry[0] == 0:
                    del self._open[batch.root]
        if anomaly:
            logger.error("internal error: %r was settled twice (as %s)", batch, fate.value)
            return
        spool = self.spool
        if closed_row is not None and spool is not None:
            spool.remove(closed_row)
        if spilled and fate is not Fate.SPOOLED and spool is not None:
            assert batch.spill_row is not None
            spool.remove(batch.spill_row)  # settled: its copy on disk goes (if SPOOLED, stays)
        if fate is Fate.FAILED:
            assert error is not None
            self.report(error)
        self._release_waiters()

    def fail(self, batch: Batch, error: DeliveryError) -> None:
        """``batch`` failed for good: reported, never spooled (again)."""
        self.settle(batch, Fate.FAILED, error)

    def give_up(self, batch: Batch, error: DeliveryError) -> None:
        """Out of time for ``batch``: spool it if there is a spool, else report it."""
        on_disk = batch.spill_row is not None  # spilled: its row stays, nothing to write
        if self.spool is None or not (self.spool_writable or on_disk):
            self.settle(batch, Fate.FAILED, error)
            return
        self.settle(batch, Fate.SPOOLED, error)
        self._spooled_reasons.append((batch.n, str(error)))

    def fail_taken(self, events: Sequence[Event], error: DeliveryError) -> None:
        """Events taken from the queue that can never be sent (unencodable, or nowhere
        left to send them at exit): failed, and reported."""
        with self._lock:
            fate = UNSENT if isinstance(error, ShutdownError) else FAILED
            self.windows.count(self.taken - self.replayed, len(events), fate)
            self.taken += len(events)
            self.failed += len(events)
        self.report(error)
        self._release_waiters()

    def refuse(self, error: DeliveryError) -> None:
        """Events refused before being queued (tracked after close): failed, reported."""
        with self._lock:
            self.discarded += len(error.events)
            self.failed += len(error.events)
            self.windows.door(len(error.events), unsent=True)
        self.report(error)

    def drop(self, n: int, *, taken: bool, reason: str, replayed: bool = False) -> int:
        """Count ``n`` events dropped for ``reason``; ``taken`` when they were popped off
        the queue (drop_oldest, too old), not refused at the door (drop_newest), nor
        ``replayed`` from the spool. The total dropped."""
        with self._lock:
            if taken:
                fate = FILTERED if reason == "before_send" else DROPPED
                self.windows.count(self.taken - self.replayed, n, fate)
                self.taken += n
            else:
                self.discarded += n
                if not replayed:
                    self.windows.door(n, unsent=False)
            self.dropped += n
            self.drops[reason] = self.drops.get(reason, 0) + n
            total = self.dropped
            self.last_loss = (time.monotonic(), f"{n} dropped ({reason})")
        if taken:
            self._release_waiters()
        return total

    def drop_oldest(self, staged: deque[Event], queue: deque[Event], reason: str) -> bool:
        """Drop the oldest queued event for ``reason`` (any thread): the first of
        ``staged`` (taken off the queue and put back), else of ``queue``. False if both
        are empty."""
        with self._lock:
            try:
                (staged or queue).popleft()
            except IndexError:  # emptied by the flusher meanwhile (another thread)
                return False
            self.movers += 1
        try:
            self.drop(1, taken=True, reason=reason)
        finally:
            self.moved()
        return True

    # -- windows (mark() and flush()) -----------------------------------------------------

    def moving(self) -> None:
        """Events are being taken off the queue (and not counted here yet): hold the end
        of any new window until `moved`."""
        with self._lock:
            self.movers += 1

    def moved(self) -> None:
        with self._lock:
            self.movers -= 1

    def window_room(self) -> int | None:
        """How many events the next batch may take before it would cross the end of a
        window (None: no window ends ahead)."""
        with self._lock:
            at = self.taken - self.replayed
            for window in self.windows.pending:
                if window.hi > at:
                    return window.hi - at
            return None

    def close_window(self, queued: Callable[[], int], inside: bool) -> Window | None:
        """End the open window after the events tracked so far (``queued()`` of them
        still wait in the queue); None while events are being taken off the queue
        (try again), unless ``inside`` (called from a hook of the part taking them)."""
        with self._lock:
            if self.movers and not inside:
                return None
            window = self.windows.close(self.taken - self.replayed + queued())
        self._release_waiters()
        return window

    def outage(self, started: bool) -> None:
        """An outage began (counted) or ended."""
        with self._lock:
            self.in_outage = started
            if started:
                self.outages += 1

    def attempt(self, retry: bool) -> None:
        """Count one request, now starting."""
        with self._lock:
            self.requests += 1
            self.requests_in_flight += 1
            if retry:
                self.retries += 1

    def answered(self, seconds: float, status: int | None, failure: str | None) -> None:
        """The request counted by `attempt` ended after ``seconds``: answered ``status``,
        or ``failure`` (no HTTP answer). Observers (`lehnz_async.otel`) are told."""
        with self._lock:
            self.requests_in_flight -= 1
            if status is not None and 200 <= status < 300:
                self.last_ok = time.monotonic()
        for observe in self.request_observers:
            try:
                observe(seconds, status, failure)
            except Exception:
                logger.exception("a request observer raised; it is left in place")

    # -- reads ----------------------------------------------------------------------------

    def stats(self, queued: int, queued_bytes: int = 0) -> Stats:
        """A snapshot that adds up, with ``queued`` events (reckoned at ``queued_bytes``
        in memory) waiting in the queue."""
        with self._lock:
            return Stats(
                tracked=self.taken + queued + self.discarded,
                delivered=self.delivered,
                failed=self.failed,
                dropped=self.dropped,
                queued=queued,
                in_flight=self.in_flight,
                spooled=self.spooled,
                batches=self.batches,
                requests=self.requests,
                retries=self.retries,
                state="outage" if self.in_outage else "healthy",
                outages=self.outages,
                backlog_bytes=self.held_bytes + queued_bytes,
                drops=dict(self.drops),
                spool_error=self.spool_error,
                internal_errors=self.internal_errors,
            )

    def oldest(self, queued: int) -> tuple[int, int | None]:
        """(events taken in so far but the ``queued`` ones, the sequence number of the
        oldest unsettled event or None if nothing waits)."""
        with self._lock:
            first = next(iter(self._open), None)
            if first is None and (queued or self.movers):  # queued, or being taken off
                first = self.taken
            # events being taken off the queue are neither queued nor counted yet: at
            # least one more has arrived than is counted
            return self.taken + (1 if self.movers else 0), first

    def settled_before(self, target: int) -> bool:
        """Whether every event with a sequence number below ``target`` is settled."""
        if self.taken < target:
            return False
        oldest = next(iter(self._open), None)
        return oldest is None or oldest >= target

    async def wait_settled(self, target: int) -> None:
        """Return once every event with a sequence number below ``target`` is settled
        (or `release_waiters` gives up waiting)."""
        if self.settled_before(target):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        await future

    def _release_waiters(self) -> None:
        if self._waiters:
            self.release_waiters(all_=False)
        if self.windows.pending:
            spool = self.spool
            with self._lock:
                done = self.windows.done(spool is not None and spool.dirty)
            for window in done:
                window.resolve()

    def release_waiters(self, all_: bool) -> None:
        """Wake the flush() calls whose events are settled (all of them: the run ended)."""
        waiting = []
        for target, future in self._waiters:
            if all_ or self.settled_before(target):
                if not future.done():
                    with contextlib.suppress(RuntimeError):  # its loop is closed
                        future.set_result(None)
            else:
                waiting.append((target, future))
        self._waiters = waiting


def _fate_index(fate: Fate, error: DeliveryError | None) -> int:
    """Where a batch settled as ``fate`` (with ``error``) counts in a window."""
    if fate is Fate.DELIVERED:
        return DELIVERED
    if fate is Fate.SPOOLED:
        return SPOOLED
    if fate is Fate.DROPPED:
        return DROPPED
    return UNSENT if isinstance(error, ShutdownError) else FAILED
