"""The sender: a pool of worker tasks that deliver batches, and the outage prober.

Every batch lives in the ledger's `Backlog` from its cut to its settlement; workers and
the outage prober take batches from it and return them to it, along one path,
`Sender._process` (take, attempt, then settle, split, back off or park), and nothing else
holds one. What each attempt's answer decides (retry, backoff, bisection of a poison
batch, giving up, the start and end of an outage) is `Attempts`' (`_attempts`); this
module owns the tasks that act on it:

- *workers*, at most ``max_concurrent_requests``, started lazily as batches are cut, each
  taking the next batch (parked ones first, then backed-off ones whose retry is due);
- during an outage workers park what they hold, and one *prober* sends a parked batch
  at growing intervals, each parked batch in turn, so that no single batch holds the
  outage open; any answer that shows the service up resumes every worker, parked
  batches first;
- a *bug* (any unexpected exception) while a batch is in hand: its parts are failed with
  the exception as the cause, counted, logged once, and the worker or prober carries on.

A cancelled worker settles nothing: its batches stay in the backlog, which the flusher
sweeps at the end of the run (to give them up at the close deadline, or to re-queue them,
same bytes and key, when the loop was torn down).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

from ._attempts import PARK, Attempts, Backoff
from ._backlog import Backlog
from ._batch import Batch
from ._exceptions import DeliveryError
from ._health import Destination
from ._ledger import Fate, Ledger
from ._retry import RetryPolicy
from ._transport import BatchTransport

logger = logging.getLogger("lehnz_async")

#: Backoff of the first probe of an outage, before jitter; doubles each probe.
PROBE_BASE_DELAY = 1.0
#: Backoff after a bug in a worker's or the prober's own loop, doubling to the cap.
RESTART_DELAY, RESTART_MAX_DELAY = 0.1, 5.0


class Sender:
    """Delivers the backlog's batches for one run of a flusher, on one loop.

    Args:
        transport: Where to POST.
        ledger: Where every batch is settled; its backlog holds every batch.
        policy: The retry policy.
        workers: Most batches in flight at once (``max_concurrent_requests``).
        rng: The source of backoff jitter (seeded in the simulation).
        destination: The endpoint's health, shared with later runs.
        endpoint: The ingestion URL, named in messages about misconfiguration.
    """

    def __init__(
        self,
        transport: BatchTransport,
        ledger: Ledger,
        policy: RetryPolicy,
        workers: int,
        rng: random.Random,
        destination: Destination,
        endpoint: str = "",
    ) -> None:
        self._ledger = ledger
        self.backlog: Backlog = ledger.backlog
        self._max_workers = workers
        self._rng = rng
        self.destination = destination
        #: sends a batch once and decides its next step
        self.attempts = Attempts(
            transport,
            ledger,
            policy,
            rng,
            destination,
            endpoint,
            outage_began=self._start_probe,
            outage_ended=self._resume,
        )
        self._workers = 0
        # set when the backlog may have a batch for a worker, or when stopping
        self._work = asyncio.Event()
        #: set when a worker finishes a batch: the flusher waits on it for a free worker
        self.freed = asyncio.Event()
        # set while the destination is healthy: parked workers wait on it
        self._resumed = asyncio.Event()
        if not destination.outage:
            self._resumed.set()
        self._probing = False
        self._stopped = False
        self._start_soon: Callable[..., Any] = lambda *args: None
        # the coroutines handed to the task group: a task cancelled before its first step
        # (a loop torn down) never starts its coroutine, which `close_unstarted` closes
        self._spawned: list[Coroutine[Any, Any, None]] = []

    def bind(self, start_soon: Callable[..., Any]) -> None:
        """Give the sender the run's task group ``start_soon``, to start workers with."""
        self._start_soon = start_soon
        if self.destination.outage:  # an outage carried over from an earlier run
            self._start_probe()
        elif self.backlog.active or self.backlog.parked:
            self.wake()  # batches left by a torn-down loop: send them first

    def _spawn(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._spawned = [
            c for c in self._spawned if inspect.getcoroutinestate(c) != inspect.CORO_CLOSED
        ]
        coro = fn()
        self._spawned.append(coro)
        self._start_soon(lambda: coro)

    def close_unstarted(self) -> None:
        """Close the coroutines whose tasks were cancelled before they began (after the
        task group has exited), so that none is left never awaited."""
        for coro in self._spawned:
            if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                coro.close()
        self._spawned.clear()

    @property
    def has_free_worker(self) -> bool:
        """Whether a batch cut now would go out at once (fewer batches ready or being
        sent than workers)."""
        return self.backlog.active < self._max_workers

    def wake(self) -> None:
        """The backlog has a batch ready (the flusher cut one): start or wake a worker."""
        self._work.set()
        if self._workers < self._max_workers and self._workers < self.backlog.active:
            # lazily: a run torn down before its first batch leaves no task unstarted
            self._workers += 1
            self._spawn(self.worker)

    def stop(self) -> None:
        """Each worker stops once the backlog has nothing ready for it (what an outage
        parks after this is sent by the prober when it ends)."""
        self._stopped = True
        self._work.set()

    # -- workers --------------------------------------------------------------------------

    async def _take(self) -> Batch | None:
        """The next batch for a worker, parked ones first, then backed-off ones whose
        retry is due; None when stopped and drained."""
        backlog, loop = self.backlog, asyncio.get_running_loop()
        while True:
            if not self._resumed.is_set():  # an outage: wait for its end (no await else)
                await self._resumed.wait()
            batch = backlog.take(parked_first=True, now=loop.time())
            if batch is not None:
                return batch
            due = backlog.next_due
            if self._stopped and due is None:
                return None
            self._work.clear()
            if due is None:  # nothing backing off: no timer (a cancel scope costs µs)
                await self._work.wait()
                continue
            with anyio.move_on_after(max(0.0, due - loop.time())):
                await self._work.wait()

    async def worker(self) -> None:
        """Deliver batches, one at a time, until stopped and drained. A bug in this loop
        itself is survived: logged once, then the worker goes on after a backoff."""
        delay = RESTART_DELAY
        while True:
            try:
                batch = await self._take()
                if batch is None:
                    return
                await self._process(batch)
                if (spool := self._ledger.spool) is not None and spool.dirty:
                    await self._ledger.commit_spool()
                delay = RESTART_DELAY
            except Exception as exc:
                self._ledger.internal_error("sender's worker", exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX_DELAY)

    async def _process(self, batch: Batch, probe: bool = False) -> bool:
        """The one path of a batch taken from the backlog: attempt it (and its halves, if
        it is split) until each part is settled, parked, or backing off in the backlog.
        With ``probe``, a retryable failure parks it again. Whatever is raised but cancellation,
        the parts in hand are settled as failed, with the exception as the cause.

        Returns whether the destination answered (for the prober).
        """
        held = [batch]
        answered = False
        try:
            while held:
                part = held[-1]
                outcome = await self.attempts.attempt(part, probe)
                if outcome is PARK:
                    for left in held:
                        self.backlog.park(left)
                    return answered
                if isinstance(outcome, Backoff):  # back to the backlog: the worker is free
                    now = asyncio.get_running_loop().time()
                    self.backlog.wait(held.pop(), outcome.due)
                    for left in held:  # halves still to send: due now
                        self.backlog.wait(left, now)
                    self._work.set()
                    return True
                answered = True
                held.pop()
                if isinstance(outcome, tuple):
                    self.backlog.replace(part, outcome)
                    held.extend(reversed(outcome))
                    probe = False  # the service is up: the halves go as a worker's would
                elif not part.settled:
                    raise AssertionError(f"{part!r} left unsettled")
        except Exception as exc:  # a bug or a surprise: never strand the events
            where = "outage prober" if probe else "sender"
            self._ledger.internal_error(where, exc)
            for part in held:
                if not part.settled and part.spill_row is not None and not part.events:
                    self._ledger.unreadable_spill(part, exc)  # its events are on disk only
                elif not part.settled:
                    error = DeliveryError(
                        f"unexpected error while delivering: {type(exc).__name__}: {exc}",
                        part.events,
                    )
                    error.__cause__ = exc
                    self._ledger.settle(part, Fate.FAILED, error)
        finally:
            self.freed.set()  # a batch left the active ones: the flusher may cut another
        return answered

    # -- the outage probe -----------------------------------------------------------------

    def _resume(self) -> None:
        """The endpoint answers again: parked workers go on, backoffs run their course."""
        self._resumed.set()
        self.wake()

    def _start_probe(self) -> None:
        self._resumed.clear()
        self.backlog.park_ready()  # no worker sends them before the outage ends
        self.freed.set()
        if not self._probing:
            self._probing = True
            self._spawn(self._probe)

    async def _probe(self) -> None:
        """While the outage lasts: send one parked batch, each in turn, one request at a
        time, at growing intervals (equal jitter, capped at ``probe_max_delay``). After
        it, if the workers have stopped already (the run is closing), send what is
        parked. A bug in this loop is survived like a worker's."""
        dest, loop = self.destination, asyncio.get_running_loop()
        probes, restart = 0, RESTART_DELAY
        try:
            while True:
                try:
                    while dest.outage:
                        ceiling = min(
                            dest.probe_max_delay, PROBE_BASE_DELAY * 2.0 ** min(probes, 30)
                        )
                        jitter = ceiling / 2 + self._rng.random() * ceiling / 2
                        delay = max(self.attempts.probe_wait, jitter)
                        self.attempts.probe_wait = 0.0
                        await anyio.sleep(delay)
                        await self.attempts.wait_pause(loop)
                        self.backlog.park_ready()
                        if not dest.outage:
                            break
                        batch = self.backlog.take_probe()
                        if batch is None:
                            continue  # nothing to probe with yet (the flusher cuts one)
                        probes += 1
                        if await self._process(batch, probe=True):
                            logger.debug("outage probe %d answered; resuming", probes)
                        await self._ledger.commit_spool()
                    self._resume()
                    while self._stopped and not dest.outage:  # closing: send what is left
                        batch = self.backlog.take(parked_first=True, now=loop.time())
                        if batch is None:
                            due = self.backlog.next_due
                            if due is None:
                                return
                            await anyio.sleep(max(0.0, due - loop.time()))
                            continue
                        await self._process(batch)
                        await self._ledger.commit_spool()
                    if not dest.outage:
                        return
                except Exception as exc:
                    self._ledger.internal_error("outage prober", exc)
                    await anyio.sleep(restart)
                    restart = min(restart * 2, RESTART_MAX_DELAY)
        finally:
            self._probing = False

    @property
    def wants_probe_batch(self) -> bool:
        """In an outage with nothing parked to probe with."""
        return self.destination.outage and not self.backlog.parked
