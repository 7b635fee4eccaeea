"""The sender: a pool of worker tasks that deliver batches, settling each in the ledger.

The flusher hands each `Batch` over with `Sender.submit` once it holds one of the
``max_concurrent_requests`` slots. A worker POSTs it; retries what is retryable with
full-jitter backoff inside the `RetryPolicy`; obeys ``Retry-After`` as a pause of every
worker; splits a batch the server refused as a whole (400/413) into halves with derived
keys; and settles every part in the ledger: delivered, failed (reported), or given up
(spooled, else reported). An unexpected exception settles the parts it held as failed,
with that exception as the cause, and the worker goes on with the next batch.

During an outage (see `Destination`) workers park what they hold instead of retrying or
giving up, and one prober task sends the oldest parked batch at growing intervals; when
an answer shows the service is up, the workers take the parked batches first, oldest
first.

A cancelled worker settles nothing: the parts it held stay unsettled, and the flusher
collects them with `leftovers` (to spool or report them at the close deadline, or to
re-queue them, same bytes and key, when the loop was torn down).
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import msgspec

from ._batch import Batch
from ._event import Event
from ._exceptions import AuthenticationError, DeliveryError, RejectedError, RetriesExhaustedError
from ._health import Destination
from ._ledger import Fate, Ledger
from ._retry import RETRYABLE_STATUSES, RetryPolicy
from ._transport import BatchTransport, Response, TransportFailure

logger = logging.getLogger("lehnz_async")

_decode_events = msgspec.json.Decoder(list[Event])
#: Backoff of the first probe of an outage, before jitter; doubles each probe.
PROBE_BASE_DELAY = 1.0


class _Retry:
    """A retryable failure of one attempt."""

    __slots__ = ("delay", "failure", "pause", "response")

    def __init__(self, failure: str, response: Response | None, delay: float | None) -> None:
        self.failure = failure
        self.response = response
        self.delay = delay  # Retry-After, if the server said
        # a rate limit or Retry-After holds every worker, not only this batch's
        self.pause = response is not None and (response.status == 429 or delay is not None)


_PARK = object()  # an outage: hand the batch back, do not retry or give up


def _by_root(batch: Batch) -> int:
    return batch.root


class Sender:
    """Delivers batches for one run of a flusher, on one loop.

    Args:
        transport: Where to POST.
        ledger: Where every batch is settled.
        policy: The retry policy.
        workers: Most batches in flight at once (``max_concurrent_requests``).
        rng: The source of backoff jitter (seeded in the simulation).
        destination: The endpoint's health, shared with later runs.
    """

    def __init__(
        self,
        transport: BatchTransport,
        ledger: Ledger,
        policy: RetryPolicy,
        workers: int,
        rng: random.Random,
        destination: Destination,
    ) -> None:
        self._transport = transport
        self._ledger = ledger
        self._policy = policy
        self._max_workers = workers
        self._rng = rng
        self.destination = destination
        #: one per batch in flight; the flusher acquires one before it cuts a batch
        self.slots = asyncio.Semaphore(workers)
        # batches handed over and not yet taken by a worker; None tells a worker to stop
        self._outbox: asyncio.Queue[Batch | None] = asyncio.Queue()
        self._workers = 0
        # the parts each worker (and the prober) holds: a batch, or what is left of it
        self._in_hand: list[list[Batch]] = []
        #: batches waiting out an outage, oldest first; sent before the outbox
        self.parked: list[Batch] = []
        # set while the destination is healthy: parked workers wait on it
        self._resumed = asyncio.Event()
        # set while an outage lasts: backoffs under way end early on it
        self._outage_began = asyncio.Event()
        if destination.outage:
            self._outage_began.set()
        else:
            self._resumed.set()
        self._probing = False
        self._stopped = False
        # loop time before which no request may start: set by 429 / Retry-After, so
        # that during a rate limit the whole sender waits, not just the batch told to
        self._paused_until = 0.0
        self._start_soon: Callable[..., Any] = lambda *args: None
        # the coroutines handed to the task group: a task cancelled before its first step
        # (a loop torn down) never starts its coroutine, which `close_unstarted` closes
        self._spawned: list[Coroutine[Any, Any, None]] = []
        #: reads a spilled batch back from the spool (set by the flusher)
        self.restore: Callable[[Batch], Any] | None = None

    def bind(self, start_soon: Callable[..., Any]) -> None:
        """Give the sender the run's task group ``start_soon``, to start workers with."""
        self._start_soon = start_soon
        if self.destination.outage:  # an outage carried over from an earlier run
            self._start_probe()

    def _spawn(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._spawned = [c for c in self._spawned if c.cr_frame is not None]  # not finished
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

    def submit(self, batch: Batch) -> None:
        """Deliver ``batch`` (the caller holds one of `slots`, released when it settles)."""
        self._outbox.put_nowait(batch)
        if self._workers < self._max_workers:
            # lazily: a run torn down before its first batch leaves no task unstarted
            self._workers += 1
            self._spawn(self.worker)

    def park(self, batch: Batch) -> None:
        """Hold ``batch`` until the outage ends (the caller holds no slot for it)."""
        bisect.insort(self.parked, batch, key=_by_root)

    def stop(self) -> None:
        """Each worker stops once the batches handed over before this call are settled
        (what an outage parks after this is sent by the prober when it ends)."""
        self._stopped = True
        for _ in range(self._workers):
            self._outbox.put_nowait(None)

    def _unqueue(self) -> None:
        """An outage: what waits in the outbox for a worker is parked (no worker will
        send it before the outage ends), and its slot given back."""
        stops = 0
        while not self._outbox.empty():
            item = self._outbox.get_nowait()
            if item is None:
                stops += 1
            else:
                self.slots.release()
                self.park(item)
        for _ in range(stops):
            self._outbox.put_nowait(None)

    def leftovers(self) -> list[Batch]:
        """Every part handed over and not settled (after the workers were cancelled),
        oldest first."""
        parts = [part for held in self._in_hand for part in held if not part.settled]
        parts += [part for part in self.parked if not part.settled]
        self.parked = []
        while not self._outbox.empty():
            item = self._outbox.get_nowait()
            if item is not None and not item.settled:
                parts.append(item)
        self._in_hand.clear()
        return sorted(parts, key=_by_root)

    # -- workers --------------------------------------------------------------------------

    async def _next(self) -> tuple[Batch | None, bool]:
        """The next batch to send, and whether it holds a slot: parked ones first."""
        await self._resumed.wait()
        if self.parked:
            return self.parked.pop(0), False
        batch = await self._outbox.get()
        return batch, batch is not None

    async def worker(self) -> None:
        """Deliver batches, one at a time, until handed None."""
        while True:
            batch, holds_slot = await self._next()
            if batch is None:
                return
            held = [batch]
            self._in_hand.append(held)
            await self._run(held)
            # cancelled: `held` stays in _in_hand, unsettled, for leftovers()
            self._in_hand.remove(held)
            if holds_slot:
                self.slots.release()
            await self._ledger.commit_spool()

    async def _run(self, held: list[Batch]) -> None:
        """Deliver ``held``, settling every part whatever is raised (but cancellation)."""
        try:
            await self._deliver(held)
        except Exception as exc:  # a bug or a surprise: never strand the events
            logger.exception("unexpected error while delivering %r", held)
            for part in held:
                if not part.settled:
                    error = DeliveryError(
                        f"unexpected error while delivering: {type(exc).__name__}: {exc}",
                        part.events,
                    )
                    error.__cause__ = exc
                    self._ledger.settle(part, Fate.FAILED, error)
            held.clear()

    async def _deliver(self, held: list[Batch]) -> None:
        """Deliver the parts in ``held``, the next one last, splitting where refused and
        parking the rest in an outage."""
        while held:
            outcome = await self._attempts(held[-1])
            if outcome is _PARK:
                for part in held:
                    self.park(part)
                held.clear()
                return
            part = held.pop()
            if isinstance(outcome, tuple):
                held.extend(reversed(outcome))
            elif not part.settled:
                raise AssertionError(f"{part!r} left unsettled")

    async def _wait_pause(self, loop: asyncio.AbstractEventLoop) -> None:
        # a loop, not one sleep: another 429 may push the pause further meanwhile. A
        # timer may fire up to the clock's resolution early: what is left below a
        # millisecond counts as done, or the loop could spin without time moving.
        while (delay := self._paused_until - loop.time()) > 0.001:  # noqa: ASYNC110
            await anyio.sleep(delay)

    async def _attempts(self, part: Batch) -> tuple[Batch, Batch] | object | None:
        """Send ``part`` until it is settled (None), must be split (its halves), or must
        wait out an outage (`_PARK`)."""
        policy, dest = self._policy, self.destination
        loop = asyncio.get_running_loop()
        while True:
            if dest.outage:
                return _PARK
            await self._wait_pause(loop)
            if dest.outage:
                return _PARK
            outcome = await self._attempt(part)
            if not isinstance(outcome, _Retry):
                return outcome
            if outcome.delay is not None:
                delay = outcome.delay
            else:
                delay = policy.delay(part.attempts, self._rng.random)
            assert part.first_attempt is not None
            elapsed = loop.time() - part.first_attempt
            spent = part.attempts >= policy.max_attempts or elapsed + delay > policy.max_time
            if dest.failed(loop.time(), outcome.failure, budget_spent=spent):
                self._start_probe()
                return _PARK
            if spent:
                response = outcome.response
                self._ledger.give_up(
                    part,
                    RetriesExhaustedError(
                        f"gave up after {part.attempts} attempt(s) in {elapsed:.1f} s; "
                        f"last: {outcome.failure}",
                        part.events,
                        status=None if response is None else response.status,
                        server_message=None if response is None else response.message,
                    ),
                )
                return None
            if outcome.pause:
                self._paused_until = max(self._paused_until, loop.time() + delay)
            logger.debug("%s; retry %d in %.3f s", outcome.failure, part.attempts, delay)
            # the backoff ends early if an outage begins: the batch is parked at once, so
            # that it goes out first when the endpoint is back, not when its backoff ends
            with anyio.move_on_after(delay):
                await self._outage_began.wait()

    async def _attempt(self, part: Batch) -> tuple[Batch, Batch] | _Retry | None:
        """One request for ``part``: settled (None), to be split (its halves), or a
        retryable failure."""
        ledger, dest = self._ledger, self.destination
        loop = asyncio.get_running_loop()
        if part.spill_row is not None and not part.events:
            assert self.restore is not None
            await self.restore(part)
        if part.first_attempt is None:
            part.first_attempt = loop.time()
        part.attempts += 1
        ledger.attempt(retry=part.attempts > 1)
        n = part.n
        started = loop.time()
        try:
            response = await self._transport.post(part.body, part.key)
        except TransportFailure as exc:
            ledger.answered(loop.time() - started, None, type(exc.__cause__ or exc).__name__)
            if exc.permanent:
                dest.answered(loop.time())  # not the service failing: never an outage
                error = DeliveryError(f"{exc} (not retried: fix the configuration)", part.events)
                error.__cause__ = exc.__cause__
                ledger.settle(part, Fate.FAILED, error)
                return None
            return _Retry(str(exc), None, None)
        except BaseException as exc:  # cancelled, or a surprise the worker settles
            ledger.answered(loop.time() - started, None, type(exc).__name__)
            raise
        status = response.status
        ledger.answered(loop.time() - started, status, None)
        failure = f"HTTP {status}: {response.message}"
        if status in RETRYABLE_STATUSES:
            return _Retry(failure, response, response.retry_after)
        if dest.answered(loop.time()):  # the service is up again
            self._resume()
        if 200 <= status < 300:
            ledger.settle(part, Fate.DELIVERED)
            return None
        if status == 413:
            dest.too_large(len(part.body))
        if status in (400, 413) and n > 1:
            logger.debug("%s for %d events; splitting", failure, n)
            ledger.unspill(part)
            return part.split()
        kind: type[DeliveryError]
        if status in (401, 403):
            kind, what = AuthenticationError, "the API key was refused"
        else:
            kind, what = RejectedError, f"the server rejected {n} event(s)"
        error = kind(
            f"{what} ({failure})", part.events, status=status, server_message=response.message
        )
        ledger.settle(part, Fate.FAILED, error)
        return None

    # -- the outage probe -----------------------------------------------------------------

    def _resume(self) -> None:
        """The endpoint answers again: parked workers go on, backoffs run their course."""
        self._outage_began.clear()
        self._resumed.set()

    def _start_probe(self) -> None:
        self._resumed.clear()
        self._outage_began.set()
        self._unqueue()
        if not self._probing:
            self._probing = True
            self._spawn(self._probe)

    async def _probe(self) -> None:
        """While the outage lasts: send the oldest parked batch, one request at a time,
        at growing intervals (equal jitter, capped at ``probe_max_delay``). After it, if
        the workers have stopped already (the run is closing), send what is parked."""
        dest, loop = self.destination, asyncio.get_running_loop()
        try:
            while True:
                await self._probe_until_answered(dest, loop)
                self._resume()
                while self._stopped and self.parked and not dest.outage:
                    held = [self.parked.pop(0)]
                    self._in_hand.append(held)
                    await self._run(held)
                    self._in_hand.remove(held)
                    await self._ledger.commit_spool()
                if not dest.outage:
                    return
        finally:
            self._probing = False

    async def _probe_until_answered(
        self, dest: Destination, loop: asyncio.AbstractEventLoop
    ) -> None:
        wait = 0.0
        probes = 0
        while dest.outage:
            ceiling = min(dest.probe_max_delay, PROBE_BASE_DELAY * 2.0 ** min(probes, 30))
            delay = max(wait, ceiling / 2 + self._rng.random() * ceiling / 2)
            await anyio.sleep(delay)
            await self._wait_pause(loop)
            self._unqueue()
            if not dest.outage or not self.parked:
                continue  # over; or nothing to probe with yet (the flusher hands one over)
            probes += 1
            held = [self.parked.pop(0)]
            self._in_hand.append(held)
            try:
                outcome = await self._attempt(held[0])
            except Exception:
                await self._run(held)  # settles it as failed, with the cause
                outcome = None
            self._in_hand.remove(held)
            if isinstance(outcome, _Retry):
                logger.debug("outage probe %d: %s", probes, outcome.failure)
                wait = outcome.delay or 0.0  # Retry-After rules
                self.park(held[0])
                continue
            logger.debug("outage probe %d answered; resuming", probes)
            if isinstance(outcome, tuple):
                for half in outcome:
                    self.park(half)
            await self._ledger.commit_spool()

    @property
    def wants_probe_batch(self) -> bool:
        """In an outage with nothing parked to probe with."""
        return self.destination.outage and not self.parked


def decode_events(body: bytes) -> list[Event]:
    return _decode_events.decode(body)
