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
event, so that ``flush()`` can wait for exactly what it covers (`wait_settled`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ._backlog import Backlog
from ._batch import memory_size
from ._event import decode_events
from ._exceptions import AuthenticationError, DeliveryError, ShutdownError
from ._spool import SpoolWriteError
from ._stats import Stats

if TYPE_CHECKING:
    from ._batch import Batch
    from ._event import Event
    from ._spool import Spool

logger = logging.getLogger("lehnz_async")


class Fate(enum.Enum):
    """How a batch ends."""

    DELIVERED = "delivered"
    FAILED = "failed"  # reported to on_error
    SPOOLED = "spooled"  # written to the spool, to be sent by a later tracker
    DROPPED = "dropped"  # counted with a reason (older than max_event_age)


class Ledger:
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
                elif fate is Fate.DROPPED:
                    self.dropped += n
                    self.drops[reason] = self.drops.get(reason, 0) + n
                else:
                    self.failed += n
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
        if fate is Fate.SPOOLED and not spilled:
            assert spool is not None
            spool.add(batch)
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
            self.taken += len(events)
            self.failed += len(events)
        self.report(error)

    def refuse(self, error: DeliveryError) -> None:
        """Events refused before being queued (tracked after close): failed, reported."""
        with self._lock:
            self.discarded += len(error.events)
            self.failed += len(error.events)
        self.report(error)

    def drop(self, n: int, *, taken: bool, reason: str) -> int:
        """Count ``n`` events dropped for ``reason``; ``taken`` when they were popped off
        the queue (drop_oldest, too old), not refused at the door (drop_newest). The
        total dropped."""
        with self._lock:
            if taken:
                self.taken += n
            else:
                self.discarded += n
            self.dropped += n
            self.drops[reason] = self.drops.get(reason, 0) + n
            return self.dropped

    def spilled(self, batch: Batch, row_id: int) -> None:
        """``batch`` was written to the spool during an outage and let go of in memory;
        it is still in flight, and its row goes when it is settled."""
        with self._lock:
            self.held_bytes -= batch.mem
            batch.mem = 0
            batch.spill_row = row_id

    def unspill(self, batch: Batch) -> None:
        """A batch read back from its spill row is being split: the halves are in memory
        only, and the row goes."""
        if batch.spill_row is not None and self.spool is not None:
            self.spool.remove(batch.spill_row)
            batch.spill_row = None

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
        for observe in self.request_observers:
            try:
                observe(seconds, status, failure)
            except Exception:
                logger.exception("a request observer raised; it is left in place")

    async def commit_spool(self) -> None:
        """Write what was spooled since the last commit. Batches that cannot be written
        (a full disk, an unwritable path) are failed and reported instead, and the spool
        is set aside (`spool_failed`)."""
        spool = self.spool
        if spool is None or not spool.dirty:
            return
        reasons, self._spooled_reasons = self._spooled_reasons, []
        try:
            await spool.commit()
        except SpoolWriteError as exc:
            events = [event for batch in exc.batches for event in batch.events]
            if events:
                with self._lock:
                    self.spooled -= len(events)
                    self.failed += len(events)
                error = DeliveryError(f"could not write the spool {spool.path}: {exc}", events)
                error.__cause__ = exc.__cause__
                self.report(error)
            self.spool_failed("write", exc)
            return
        for n, why in reasons:  # said only once they are on disk
            logger.log(
                logging.DEBUG if self._spool_logged else logging.WARNING,
                "%d event(s) spooled to %s (%s); they are re-sent when a tracker next starts",
                n,
                spool.path,
                why,
            )
            self._spool_logged = True

    def unreadable_spill(self, batch: Batch, exc: BaseException) -> None:
        """A batch spilled during an outage could not be read back: its row stays in the
        spool (spooled, re-sent when a tracker next starts), and the failure is logged."""
        logger.error(
            "could not read back %d spilled event(s) from the spool (%s: %s); they stay "
            "there and are re-sent when a tracker next starts",
            batch.n,
            type(exc).__name__,
            exc,
        )
        self.settle(batch, Fate.SPOOLED)

    def spool_failed(self, doing: str, exc: BaseException) -> None:
        """The spool could not be opened, read or written: the tracker runs on without
        writing to it (what could not be written is already reported). A file that could
        not be read is let go of and moved aside (``<path>.unusable-<time>``), never
        deleted, so that whatever it held is kept for a person to look at; one that could
        not be written (a full disk) is still read back. Logged once at ERROR, and in
        `stats`."""
        spool = self.spool
        if spool is None or (doing == "write" and not self.spool_writable):
            return
        self.spool_writable = False
        where = ""
        if doing != "write":
            self.spool = None
            aside = spool.set_aside()
            where = f"; moved aside to {aside}" if aside else ""
        self.spool_error = f"could not {doing} the spool {spool.path}: {exc}{where}"
        logger.error("%s; running on without writing to a spool", self.spool_error)

    def internal_error(self, where: str, exc: Exception) -> None:
        """A bug caught in ``where``: counted, logged once (with its traceback) for each
        place and kind of exception, later ones at DEBUG."""
        kind = (where, type(exc))
        with self._lock:
            self.internal_errors += 1
            seen = kind in self._internal_logged
            self._internal_logged.add(kind)
        logger.log(
            logging.DEBUG if seen else logging.ERROR,
            "internal error in the %s: %s: %s; the batches in hand are failed, and it goes on",
            where,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )

    # -- reports --------------------------------------------------------------------------

    def report(self, error: DeliveryError) -> None:
        """Log the first failure of its kind at WARNING (a refused key at ERROR), later ones
        at DEBUG, and hand ``error`` to on_error (what that raises is logged)."""
        if self.endpoint and error.endpoint is None:
            error.endpoint = self.endpoint
        kind = (type(error), error.status)
        with self._lock:
            seen = kind in self._reported_kinds
            self._reported_kinds.add(kind)
        if seen:
            level = logging.DEBUG
        elif isinstance(error, AuthenticationError) or error.__cause__ is not None:
            level = logging.ERROR  # every batch will fail alike, or a bug: say it loudly
        else:
            level = logging.WARNING
        logger.log(level, "%d event(s) not delivered: %s", len(error.events), error)
        if self._on_error is None:
            return
        local = self._in_on_error
        if getattr(local, "active", False):  # on_error led here (it tracked after close)
            logger.warning(
                "%d event(s) failed while on_error ran (%s): not passed to on_error again",
                len(error.events),
                error,
            )
            return
        local.active = True
        started = time.perf_counter()
        try:
            self._on_error(error)
        except Exception:
            logger.exception("on_error raised; the error it was given is logged above")
        finally:
            local.active = False
        self.slow_hook("on_error", time.perf_counter() - started)

    def slow_hook(self, name: str, seconds: float) -> None:
        """Log, once per hook, a call of ``name`` that took ``seconds`` if that is over
        `SLOW_HOOK`: a hook runs on the tracker's loop, and holds every delivery."""
        if seconds > SLOW_HOOK and name not in self._slow_hooks:
            self._slow_hooks.add(name)
            _log_slow_hook(name, seconds)

    # -- reads ----------------------------------------------------------------------------

    async def restore(self, batch: Batch) -> None:
        """Read a batch spilled during an outage back from the spool, to send it.

        Raises:
            LookupError: its row is gone, or the spool with it.
        """
        spool = self.spool
        if spool is None or batch.spill_row is None:
            raise LookupError(f"the spool holding {batch!r} was set aside")
        body = await spool.read(batch.spill_row)
        if body is None:
            raise LookupError(f"spool row {batch.spill_row} of {batch!r} is gone")
        batch.events, batch.body = decode_events(body), body
        with self._lock:
            batch.mem = memory_size(len(batch.body), batch.n)
            self.held_bytes += batch.mem

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


#: The message of events still unsettled when the close deadline passed.
UNSENT_AT_CLOSE = (
    "the close deadline passed before these events were acknowledged "
    "(they may or may not have reached the server)"
)


#: Seconds a before_send or on_error call may take before it is logged (once) as slow.
SLOW_HOOK = 0.1


def _log_slow_hook(name: str, seconds: float) -> None:
    logger.warning(
        "%s took %.3f s (more than %.1f s): it runs on the tracker's event loop and "
        "holds every delivery meanwhile; keep it fast",
        name,
        seconds,
        SLOW_HOOK,
    )


#: The message of events still unsettled at the close deadline that were never sent.
NEVER_SENT_AT_CLOSE = (
    "the close deadline passed before these events could be sent (no attempt reached the server)"
)


def shutdown_error(events: Sequence[Event], message: str = UNSENT_AT_CLOSE) -> ShutdownError:
    return ShutdownError(message, events)


def close_deadline_error(batch: Batch, outage: str = "") -> ShutdownError:
    """The error of ``batch``, unsettled at the close deadline: whether it may have
    reached the server depends on how its attempts ended; why it was not delivered
    sooner is its last attempt's failure, or ``outage``'s cause (the endpoint was down)."""
    message = UNSENT_AT_CLOSE if batch.maybe_sent else NEVER_SENT_AT_CLOSE
    if outage:
        message = f"{message}; the endpoint was down: {outage}"
    elif batch.last_failure:
        message = f"{message}; its last attempt: {batch.last_failure}"
    return ShutdownError(message, batch.events)
