"""The sender: a pool of worker tasks that deliver batches, settling each in the ledger.

Every batch lives in the ledger's `Backlog` from its cut to its settlement; workers and
the outage prober take batches from it and return them to it, along one path,
`Sender._process` (take, attempt, settle), and nothing else holds one.

Failures are contained by scope:

- a *batch*: retryable failures are retried with full-jitter backoff inside the
  `RetryPolicy`; a batch refused as a whole (400/413) is split into halves with derived
  keys; a batch that keeps getting 5xx while other batches are accepted holds a poison
  event, and is bisected at once, so that its good events go and the poison one is
  finally given up (`RetriesExhaustedError`, or the spool) on its own. (Not if an
  attempt may have stored it, a timeout or a lost answer: halves have new keys, so the
  server could store their events twice. Such a batch is retried and given up whole.)
- the *destination*: only evidence across batches (see `Destination`) starts an outage.
  During an outage workers park what they hold, and one prober sends a parked batch at
  growing intervals, each parked batch in turn, so that no single batch holds the
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

from ._backlog import Backlog
from ._batch import Batch
from ._exceptions import AuthenticationError, DeliveryError, RejectedError, RetriesExhaustedError
from ._health import Destination
from ._ledger import Fate, Ledger
from ._retry import RETRYABLE_STATUSES, RetryPolicy
from ._transport import BatchTransport, Response, TransportFailure

logger = logging.getLogger("lehnz_async")

#: Backoff of the first probe of an outage, before jitter; doubles each probe.
PROBE_BASE_DELAY = 1.0
#: Consecutive 5xx answers to one batch, while others are accepted, before it is
#: bisected as holding a poison event.
POISON_AFTER = 2
#: Backoff after a bug in a worker's or the prober's own loop, doubling to the cap.
RESTART_DELAY, RESTART_MAX_DELAY = 0.1, 5.0
_INGEST_PATH = "/api/v1/events/ingest"


class _Retry:
    """A retryable failure of one attempt."""

    __slots__ = ("delay", "failure", "pause", "response", "unreachable")

    def __init__(
        self, failure: str, response: Response | None, delay: float | None, unreachable: bool
    ) -> None:
        self.failure = failure
        self.response = response
        self.delay = delay  # Retry-After, if the server said
        self.unreachable = unreachable  # no connection could be made
        # a rate limit or Retry-After holds every worker, not only this batch's
        self.pause = response is not None and (response.status == 429 or delay is not None)


_PARK = object()  # an outage: the batch waits in the backlog, neither retried nor given up


class _Backoff:
    """A retryable failure within the budget: retry at ``due`` (loop time)."""

    __slots__ = ("due",)

    def __init__(self, due: float) -> None:
        self.due = due


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
        self._transport = transport
        self._ledger = ledger
        self.backlog: Backlog = ledger.backlog
        self._policy = policy
        self._max_workers = workers
        self._rng = rng
        self.destination = destination
        self._endpoint = endpoint
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
        # loop time before which no request may start: set by 429 / Retry-After, so
        # that during a rate limit the whole sender waits, not just the batch told to
        self._paused_until = 0.0
        self._start_soon: Callable[..., Any] = lambda *args: None
        # the coroutines handed to the task group: a task cancelled before its first step
        # (a loop torn down) never starts its coroutine, which `close_unstarted` closes
        self._spawned: list[Coroutine[Any, Any, None]] = []
        self._misconfig_logged: set[str] = set()
        # Retry-After of the last probe's answer: the next probe waits at least that
        self._probe_wait = 0.0

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
                outcome = await self._attempts(part, probe)
                if outcome is _PARK:
                    for left in held:
                        self.backlog.park(left)
                    return answered
                if isinstance(outcome, _Backoff):  # back to the backlog: the worker is free
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

    async def _wait_pause(self, loop: asyncio.AbstractEventLoop) -> None:
        # a loop, not one sleep: another 429 may push the pause further meanwhile. A
        # timer may fire up to the clock's resolution early: what is left below a
        # millisecond counts as done, or the loop could spin without time moving.
        while (delay := self._paused_until - loop.time()) > 0.001:  # noqa: ASYNC110
            await anyio.sleep(delay)

    async def _attempts(self, part: Batch, probe: bool) -> tuple[Batch, Batch] | object | None:
        """Attempt ``part`` once: it is settled (None), must be split (its halves), must
        back off before its next attempt (`_Backoff`, in the backlog, not in a worker's
        hand), or must wait out an outage (`_PARK`)."""
        policy, dest = self._policy, self.destination
        loop = asyncio.get_running_loop()
        if dest.outage and not probe:
            return _PARK
        await self._wait_pause(loop)
        if dest.outage and not probe:
            return _PARK
        outcome = await self._attempt(part)
        if not isinstance(outcome, _Retry):
            return outcome
        part.last_failure = outcome.failure
        if probe:
            logger.debug("outage probe: %s", outcome.failure)
            self._probe_wait = outcome.delay or 0.0  # Retry-After rules
            return _PARK
        if outcome.delay is not None:
            delay = outcome.delay
        else:
            delay = policy.delay(part.attempts, self._rng.random)
        assert part.first_attempt is not None
        elapsed = loop.time() - part.first_attempt
        spent = part.attempts >= policy.max_attempts or elapsed + delay > policy.max_time
        poisoned = self._poisoned(part, outcome)
        if not poisoned and dest.failed(
            loop.time(),
            outcome.failure,
            part.root,
            unreachable=outcome.unreachable,
            budget_spent=spent,
        ):
            self._start_probe()
            return _PARK
        # a batch given up once already on 5xx (read back from the spool) is not spooled
        # again as it is: a poison event would keep it going round
        relapse = spent and part.replayed and part.failures_5xx >= POISON_AFTER
        if (poisoned or relapse) and part.n > 1 and not part.maybe_sent:  # halves: new keys
            # 5xx for this batch alone: a poison event is in it; its halves are tried
            # apart. While others are accepted each half gets a retry budget of its own;
            # a relapse's halves share what is left of it (one attempt each).
            logger.debug("%s for %d events, a poison event: bisecting", outcome.failure, part.n)
            self._ledger.unspill(part)
            halves = part.split()
            for half in halves:
                if not poisoned:
                    half.attempts, half.first_attempt = part.attempts, part.first_attempt
                    half.failures_5xx = part.failures_5xx
            return halves
        if spent:
            response = outcome.response
            settle = self._ledger.fail if relapse else self._ledger.give_up
            settle(
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
        # if an outage begins meanwhile it is parked at once (`Backlog.park_ready`), so
        # that it goes out first when the endpoint is back
        return _Backoff(loop.time() + delay)

    def _poisoned(self, part: Batch, outcome: _Retry) -> bool:
        """Whether ``part`` keeps getting 5xx while other batches are accepted: its own
        fault (a poison event), not the destination's."""
        response = outcome.response
        if response is None or response.status < 500:
            part.failures_5xx = 0
            return False
        if part.failures_5xx == 0:
            part.others_ok = self.destination.accepted
        part.failures_5xx += 1
        return part.failures_5xx >= POISON_AFTER and self.destination.accepted > part.others_ok

    async def _attempt(self, part: Batch) -> tuple[Batch, Batch] | _Retry | None:
        """One request for ``part``: settled (None), to be split (its halves), or a
        retryable failure."""
        ledger, dest = self._ledger, self.destination
        loop = asyncio.get_running_loop()
        if part.spill_row is not None and not part.events:
            try:
                await ledger.restore(part)
            except Exception as exc:  # storage's failure: the events stay on disk
                ledger.unreadable_spill(part, exc)
                return None
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
            part.maybe_sent |= exc.reached
            self._misconfigured(exc.hint, str(exc))
            if exc.permanent:
                dest.answered(loop.time())  # not the service failing: never an outage
                error = DeliveryError(f"{exc} (not retried: fix the configuration)", part.events)
                error.__cause__ = exc.__cause__
                ledger.settle(part, Fate.FAILED, error)
                return None
            return _Retry(str(exc), None, None, unreachable=not exc.reached)
        except BaseException as exc:  # cancelled, or a surprise the caller settles
            part.maybe_sent = True  # it may have reached the server meanwhile
            ledger.answered(loop.time() - started, None, type(exc).__name__)
            raise
        status = response.status
        ledger.answered(loop.time() - started, status, None)
        failure = f"HTTP {status}: {response.message}"
        if status in RETRYABLE_STATUSES:
            return _Retry(failure, response, response.retry_after, unreachable=False)
        if status in (404, 405):
            self._misconfigured(
                f"is it the ingestion URL? It ends in {_INGEST_PATH}"
                if not self._endpoint.rstrip("/").endswith(_INGEST_PATH)
                else "is the host the ingestion service?",
                failure,
            )
        if dest.answered(loop.time(), accepted=200 <= status < 300):  # up again
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

    def _misconfigured(self, hint: str, failure: str) -> None:
        """Before the endpoint has ever answered, say at once (ERROR, once per hint)
        what in the configuration looks wrong."""
        if not hint or self.destination.ever_answered or hint in self._misconfig_logged:
            return
        self._misconfig_logged.add(hint)
        logger.error("the endpoint %s looks misconfigured: %s (%s)", self._endpoint, hint, failure)

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
                        delay = max(self._probe_wait, jitter)
                        self._probe_wait = 0.0
                        await anyio.sleep(delay)
                        await self._wait_pause(loop)
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
