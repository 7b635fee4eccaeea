"""The sender: a pool of worker tasks that deliver batches, settling each in the ledger.

The flusher hands each `Batch` over with `Sender.submit` once it holds one of the
``max_concurrent_requests`` slots. A worker POSTs it; retries what is retryable with
full-jitter backoff inside the `RetryPolicy`; obeys ``Retry-After`` as a pause of every
worker; splits a batch the server refused as a whole (400/413) into halves with derived
keys; and settles every part in the ledger: delivered, failed (reported), or given up
(spooled, else reported). An unexpected exception settles the parts it held as failed,
with that exception as the cause, and the worker goes on with the next batch.

A cancelled worker settles nothing: the parts it held stay unsettled, and the flusher
collects them with `leftovers` (to spool or report them at the close deadline, or to
re-queue them, same bytes and key, when the loop was torn down).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import anyio

from ._batch import Batch
from ._exceptions import AuthenticationError, DeliveryError, RejectedError, RetriesExhaustedError
from ._ledger import Fate, Ledger
from ._retry import RETRYABLE_STATUSES, RetryPolicy
from ._transport import BatchTransport, Response, TransportFailure

logger = logging.getLogger("lehnz_async")


class Sender:
    """Delivers batches for one run of a flusher, on one loop.

    Args:
        transport: Where to POST.
        ledger: Where every batch is settled.
        policy: The retry policy.
        workers: Most batches in flight at once (``max_concurrent_requests``).
        rng: The source of backoff jitter (seeded in the simulation).
    """

    def __init__(
        self,
        transport: BatchTransport,
        ledger: Ledger,
        policy: RetryPolicy,
        workers: int,
        rng: random.Random,
    ) -> None:
        self._transport = transport
        self._ledger = ledger
        self._policy = policy
        self._max_workers = workers
        self._rng = rng
        #: one per batch in flight; the flusher acquires one before it cuts a batch
        self.slots = asyncio.Semaphore(workers)
        # batches handed over and not yet taken by a worker; None tells a worker to stop
        self._outbox: asyncio.Queue[Batch | None] = asyncio.Queue()
        self._workers = 0
        # the parts each worker holds: a batch, or what is left of it after splits
        self._in_hand: list[list[Batch]] = []
        # loop time before which no request may start: set by 429 / Retry-After, so
        # that during a rate limit the whole sender waits, not just the batch told to
        self._paused_until = 0.0
        self._start_worker: Callable[[], object] = lambda: None

    def bind(self, start_soon: Callable[[], object]) -> None:
        """Give the sender the function that starts one worker in the run's task group."""
        self._start_worker = start_soon

    def submit(self, batch: Batch) -> None:
        """Deliver ``batch`` (the caller holds one of `slots`, released when it settles)."""
        self._outbox.put_nowait(batch)
        if self._workers < self._max_workers:
            # lazily: a run torn down before its first batch leaves no task unstarted
            self._workers += 1
            self._start_worker()

    def stop(self) -> None:
        """Each worker stops once the batches handed over before this call are settled."""
        for _ in range(self._workers):
            self._outbox.put_nowait(None)

    def leftovers(self) -> list[Batch]:
        """Every part handed over and not settled (after the workers were cancelled),
        oldest first."""
        parts = [part for held in self._in_hand for part in held if not part.settled]
        while not self._outbox.empty():
            item = self._outbox.get_nowait()
            if item is not None and not item.settled:
                parts.append(item)
        self._in_hand.clear()
        return sorted(parts, key=lambda part: part.root)

    async def worker(self) -> None:
        """Deliver batches from the outbox, one at a time, until handed None."""
        ledger = self._ledger
        while (batch := await self._outbox.get()) is not None:
            held = [batch]
            self._in_hand.append(held)
            try:
                await self._deliver(held)
            except Exception as exc:  # a bug or a surprise: never strand the events
                logger.exception("unexpected error while delivering %r", batch)
                for part in held:
                    if not part.settled:
                        error = DeliveryError(
                            f"unexpected error while delivering: {type(exc).__name__}: {exc}",
                            part.events,
                        )
                        error.__cause__ = exc
                        ledger.settle(part, Fate.FAILED, error)
            # cancelled: `held` stays in _in_hand, unsettled, for leftovers()
            self._in_hand.remove(held)
            self.slots.release()
            await ledger.commit_spool()

    async def _deliver(self, held: list[Batch]) -> None:
        """Deliver the parts in ``held``, the next one last, splitting where refused."""
        while held:
            halves = await self._attempts(held[-1])
            part = held.pop()
            if halves is not None:
                held.extend(reversed(halves))
            elif not part.settled:
                raise AssertionError(f"{part!r} left unsettled")

    async def _wait_pause(self, loop: asyncio.AbstractEventLoop) -> None:
        # a loop, not one sleep: another 429 may push the pause further meanwhile. A
        # timer may fire up to the clock's resolution early: what is left below a
        # millisecond counts as done, or the loop could spin without time moving.
        while (delay := self._paused_until - loop.time()) > 0.001:  # noqa: ASYNC110
            await anyio.sleep(delay)

    async def _attempts(self, part: Batch) -> tuple[Batch, Batch] | None:
        """Send ``part`` until it is settled (None) or must be split (its halves)."""
        ledger, policy = self._ledger, self._policy
        loop = asyncio.get_running_loop()
        n = len(part.events)
        while True:
            await self._wait_pause(loop)
            if part.first_attempt is None:
                part.first_attempt = loop.time()
            part.attempts += 1
            ledger.attempt(retry=part.attempts > 1)
            response: Response | None
            try:
                response = await self._transport.post(part.body, part.key)
            except TransportFailure as exc:
                response, failure = None, str(exc)
            if response is not None:
                status = response.status
                if 200 <= status < 300:
                    ledger.settle(part, Fate.DELIVERED)
                    return None
                failure = f"HTTP {status}: {response.message}"
                if status in (400, 413) and n > 1:
                    logger.debug("%s for %d events; splitting", failure, n)
                    return part.split()
                if status in (401, 403) or status not in RETRYABLE_STATUSES:
                    kind: type[DeliveryError]
                    if status in (401, 403):
                        kind, what = AuthenticationError, "the API key was refused"
                    else:
                        kind, what = RejectedError, f"the server rejected {n} event(s)"
                    error = kind(
                        f"{what} ({failure})",
                        part.events,
                        status=status,
                        server_message=response.message,
                    )
                    ledger.settle(part, Fate.FAILED, error)
                    return None
            if response is not None and response.retry_after is not None:
                delay = response.retry_after
            else:
                delay = policy.delay(part.attempts, self._rng.random)
            elapsed = loop.time() - part.first_attempt
            if part.attempts >= policy.max_attempts or elapsed + delay > policy.max_time:
                ledger.give_up(
                    part,
                    RetriesExhaustedError(
                        f"gave up after {part.attempts} attempt(s) in {elapsed:.1f} s; "
                        f"last: {failure}",
                        part.events,
                        status=None if response is None else response.status,
                        server_message=None if response is None else response.message,
                    ),
                )
                return None
            if response is not None and (
                response.status == 429 or response.retry_after is not None
            ):
                self._paused_until = max(self._paused_until, loop.time() + delay)
            logger.debug("%s; retry %d in %.3f s", failure, part.attempts, delay)
            await anyio.sleep(delay)
