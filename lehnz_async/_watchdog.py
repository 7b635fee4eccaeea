"""Health: whether delivery works, and a watchdog for a sender that stalls.

A sender that has stalled or died looks, from the outside, just like a quiet one. The
watchdog tells them apart: one daemon thread per process (started with the first
tracker's run, again in a forked child) looks at every live tracker about four times per
``stall_timeout``, off the tracker's loop, so that a loop that never runs is seen too.
A tracker is *stalled* when its oldest unsettled event has waited ``stall_timeout``
seconds and nothing was delivered for as long. Then the watchdog logs one ERROR that says
for how long and what it sees (the loop not running, a ``before_send`` that does not
return, requests without an answer, an outage), `Tracker.health` reports it (``down``),
and `lehnz_async.otel` exports its length as a gauge. When delivery resumes it logs that
once, at WARNING.

How old the oldest event is comes from samples of the tracker's sequence numbers (how
many events it had taken in, at each look), so it needs no clock read in ``track()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from ._binding import State

if TYPE_CHECKING:
    from ._binding import LoopBinding
    from ._buffer import Buffer
    from ._health import Destination
    from ._ledger import Ledger

logger = logging.getLogger("lehnz_async")

#: Seconds after a loss (a failed or dropped event) that health() still says "degraded".
RECENT_LOSS = 60.0


class Health(NamedTuple):
    """Whether a tracker's delivery works (see `Tracker.health`)."""

    #: ``"ok"``, ``"degraded"`` (delivering, but something is wrong: events were lost
    #: recently, or the spool was set aside) or ``"down"`` (not delivering: closed, in an
    #: outage, or stalled).
    status: str
    #: Why, when the status is not ``"ok"``; else ``""``.
    reason: str
    #: Seconds since the server last acknowledged a batch (2xx), or None if it never has.
    last_delivery_age: float | None
    #: Events queued or in flight.
    backlog_events: int
    #: Bytes they are reckoned to hold in memory.
    backlog_bytes: int
    #: ``"healthy"`` or ``"outage"`` (as `Stats.state`), or ``"closed"``.
    state: str
    #: Seconds the tracker has been stalled (see the README's Health section), or 0.0.
    stalled_for: float


class Probe(NamedTuple):
    """What the watchdog reads of one tracker, through callables that never block."""

    #: (events taken in so far, queued, sequence number of the oldest unsettled event
    #: or None) as one consistent reading
    progress: Callable[[], tuple[int, int, int | None]]
    #: the loop running the tracker, if one runs it
    loop: Callable[[], asyncio.AbstractEventLoop | None]
    #: what the tracker is doing now, in words, for the stall's message, given how long
    #: its loop has not answered and the stall timeout
    doing: Callable[[float, float], str]


class Watch:
    """One tracker's stall detector; `check` is called by the watchdog thread (or a
    test, with its own clock)."""

    def __init__(self, timeout: float, ledger: Ledger, probe: Probe) -> None:
        self.timeout = timeout
        self._ledger = ledger
        self._probe = probe
        #: (time, events taken in by then), one per look while events wait
        self._samples: deque[tuple[float, int]] = deque()
        self._since: float | None = None  # when the watch began looking
        #: time.monotonic() the tracker's loop last ran a callback the watchdog sent it
        self.pong = 0.0
        self._ping_sent = 0.0
        #: when the current stall began (as judged at the look that found it), or None
        self.stalled_since: float | None = None
        self.reason = ""

    def stalled_for(self, now: float) -> float:
        return 0.0 if self.stalled_since is None else now - self.stalled_since

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest unsettled event has waited (at least), or 0.0."""
        arrivals, _, oldest = self._probe.progress()
        samples = self._samples
        if oldest is None:
            samples.clear()
            return 0.0
        # samples taken before the oldest event arrived tell nothing about it
        while samples and samples[0][1] <= oldest:
            samples.popleft()
        if not samples or samples[-1][1] != arrivals:
            samples.append((now, arrivals))
        return now - samples[0][0]

    def check(self, now: float) -> None:
        """Look once: log the start (ERROR) and the end (WARNING) of a stall."""
        if self._since is None:
            self._since = self.pong = now
        self._ping(now)
        waited = self.oldest_age(now)
        last_ok = self._ledger.last_ok
        quiet = now - (self._since if last_ok is None else max(last_ok, self._since))
        stalled = waited >= self.timeout and quiet >= self.timeout
        if stalled and self.stalled_since is None:
            self.stalled_since = now - min(waited, quiet)
            _, queued, _ = self._probe.progress()
            waiting = queued + self._ledger.in_flight
            doing = self._probe.doing(now - self.pong, self.timeout)
            self.reason = (
                f"nothing delivered for {quiet:.1f} s while {waiting} event(s) wait, "
                f"the oldest for {waited:.1f} s: {doing}"
            )
            logger.error("stalled (stall_timeout=%.1f s): %s", self.timeout, self.reason)
        elif not stalled and self.stalled_since is not None:
            logger.warning(
                "no longer stalled, after %.1f s: %s",
                now - self.stalled_since,
                "delivering again" if waited < self.timeout else "nothing waits any more",
            )
            self.stalled_since = None
            self.reason = ""

    def _ping(self, now: float) -> None:
        """Ask the tracker's loop to say it runs (`pong`): a loop that never answers is
        blocked (or stopped)."""
        loop = self._probe.loop()
        if loop is None:
            self.pong = now  # no loop to wait on: nothing is blocked
            return
        if self._ping_sent > self.pong:
            return  # the last one is not answered yet
        self._ping_sent = now
        try:
            loop.call_soon_threadsafe(self._answer)
        except RuntimeError:  # closed: the binding moves the tracker to another loop
            self.pong = now

    def _answer(self) -> None:
        self.pong = time.monotonic()


class _Watchdog:
    """The one thread that looks at every watched tracker."""

    def __init__(self) -> None:
        self.watches: weakref.WeakSet[Watch] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._errors: set[type] = set()
        self._changed = threading.Event()  # a watch was added: look at the intervals again

    def watch(self, watch: Watch) -> None:
        with self._lock:
            self.watches.add(watch)
        self._changed.set()

    def ensure_running(self) -> None:
        """Start the thread if it does not run (first tracker; a forked child). Never
        raises: without a watchdog (no thread may start while Python 3.12+ shuts down,
        when the exit hook runs a tracker) delivery goes on unwatched."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            thread = threading.Thread(target=self._main, name="lehnz_async-watchdog")
            thread.daemon = True
            try:
                thread.start()
            except RuntimeError as exc:  # "can't create new thread at interpreter shutdown"
                logger.debug("the stall watchdog could not start: %s", exc)
                return
            self._thread = thread

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._thread = None

    def _main(self) -> None:
        while True:
            with self._lock:  # (a WeakSet changes as trackers come and go)
                watches = list(self.watches)
            interval = min([w.timeout / 4 for w in watches] + [1.0])
            if self._changed.wait(max(0.01, interval)):
                self._changed.clear()
                continue
            now = time.monotonic()
            for watch in watches:
                try:
                    watch.check(now)
                except Exception as exc:  # a bug here must not stop the watching
                    if type(exc) not in self._errors:
                        self._errors.add(type(exc))
                        logger.exception("internal error in the watchdog; it goes on")


WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=WATCHDOG._after_fork)


def describe(
    *,
    loop_silent: float,
    timeout: float,
    hook: str,
    running: bool,
    requests: int,
    outage: str,
    endpoint: str,
) -> str:
    """What a stalled tracker is doing, in words, most telling first."""
    if hook:
        return f"{hook} has not returned (it runs on the tracker's loop and holds it)"
    if loop_silent >= timeout / 2:
        return (
            f"the event loop running the tracker has not run for {loop_silent:.1f} s "
            "(a blocking call on it, or a frozen thread)"
        )
    if not running:
        return "no flusher runs (the tracker's loop stopped without aclose()?)"
    if outage:
        return f"the endpoint is down: {outage}"
    if requests:
        return f"{requests} request(s) to {endpoint} sent and not answered yet"
    return "the sender is not sending (a bug: please report it)"


def probe_of(
    ledger: Ledger, buffer: Buffer, binding: LoopBinding, destination: Destination
) -> Probe:
    """The watchdog's view of one tracker's parts."""

    def progress() -> tuple[int, int, int | None]:
        queued = buffer.queued
        taken, oldest = ledger.oldest(queued)
        return taken + queued, queued, oldest

    def loop() -> asyncio.AbstractEventLoop | None:
        return binding.loop if binding.state is State.RUNNING else None

    def doing(loop_silent: float, timeout: float) -> str:
        flusher = binding.flusher
        hook = ledger.hook_running or (
            "before_send" if flusher is not None and flusher.in_hook else ""
        )
        return describe(
            loop_silent=loop_silent,
            timeout=timeout,
            hook=hook,
            running=binding.state is State.RUNNING,
            requests=ledger.requests_in_flight,
            outage=destination.cause if destination.outage else "",
            endpoint=ledger.endpoint,
        )

    return Probe(progress, loop, doing)


def health_of(
    watch: Watch | None, ledger: Ledger, buffer: Buffer, destination: Destination, closed: bool
) -> Health:
    """`Tracker.health`: read from the ledger, the buffer and the watch."""
    now = time.monotonic()
    stats = ledger.stats(buffer.queued, buffer.queued_bytes)
    last_ok = ledger.last_ok
    stalled = 0.0 if watch is None else watch.stalled_for(now)
    status, reason = "ok", ""
    if closed:
        status, reason = "down", "the tracker is closed"
    elif stalled:
        assert watch is not None
        status, reason = "down", f"stalled for {stalled:.1f} s: {watch.reason}"
    elif stats.state == "outage":
        status, reason = "down", f"the endpoint is down: {destination.cause}"
    elif stats.spool_error:
        status, reason = "degraded", stats.spool_error
    elif ledger.last_loss is not None and now - ledger.last_loss[0] < RECENT_LOSS:
        status = "degraded"
        reason = f"events lost {now - ledger.last_loss[0]:.1f} s ago: {ledger.last_loss[1]}"
    return Health(
        status=status,
        reason=reason,
        last_delivery_age=None if last_ok is None else now - last_ok,
        backlog_events=stats.queued + stats.in_flight,
        backlog_bytes=stats.backlog_bytes,
        state="closed" if closed else stats.state,
        stalled_for=stalled,
    )
