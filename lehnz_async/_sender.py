"""Delivering one batch: POST, retry with backoff, split on 400/413, settle every event.

Every event handed to `Sender.deliver` ends counted exactly once in the ledger, as
delivered or failed (reported through ``report``), even when the delivery is cancelled
at the close deadline.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable

import anyio

from ._event import Event, encoder
from ._exceptions import (
    AuthenticationError,
    DeliveryError,
    RejectedError,
    RetriesExhaustedError,
    ShutdownError,
)
from ._retry import RETRYABLE_STATUSES, backoff_delay
from ._stats import Ledger
from ._transport import BatchTransport, Response, TransportFailure

logger = logging.getLogger("lehnz_async")


class _Outcome(enum.Enum):
    SETTLED = enum.auto()  # delivered or failed: nothing more to do
    SPLIT = enum.auto()  # the server refused the whole; send the halves separately


_SHUTDOWN_MESSAGE = (
    "the close deadline passed before these events were acknowledged "
    "(they may or may not have reached the server)"
)


def new_idempotency_key() -> str:
    return os.urandom(16).hex()  # 128 random bits, like a uuid4, for a fifth of the cost


class Sender:
    """Sends batches with the retry policy; shared by all concurrent delivery tasks.

    Args:
        transport: Where to POST.
        ledger: Counters to settle events in.
        report: Called with each `DeliveryError` that is final (rejected, refused key):
            counts it as failed, logs it, calls on_error.
        give_up: Called with events that were not delivered for want of time (retries
            ran out on a retryable failure, or the close deadline passed), with their
            body and idempotency key, so that they can be spooled instead of failed.
        max_attempts: Attempts per batch, the first included.
        max_retry_time: Seconds from a batch's first attempt after which no retry starts.
        retry_base_delay: Backoff of the first retry (before jitter).
        retry_max_delay: Cap of the backoff (before jitter); Retry-After is not capped.
    """

    def __init__(
        self,
        transport: BatchTransport,
        ledger: Ledger,
        report: Callable[[DeliveryError], None],
        give_up: Callable[[DeliveryError, bytes, str], None],
        *,
        max_attempts: int,
        max_retry_time: float,
        retry_base_delay: float,
        retry_max_delay: float,
    ) -> None:
        self._transport = transport
        self._ledger = ledger
        self._report = report
        self._give_up = give_up
        self._max_attempts = max_attempts
        self._max_retry_time = max_retry_time
        self._base_delay = retry_base_delay
        self._max_delay = retry_max_delay
        # time.monotonic() before which no request may start: set by 429 / Retry-After,
        # so that during a rate limit the whole sender waits, not just the batch that
        # was told to.
        self._paused_until = 0.0

    async def deliver(self, events: list[Event], body: bytes, key: str) -> None:
        """Deliver ``events`` (already encoded as ``body``), bisecting where refused.

        Args:
            events: The events, settled in the ledger one way or another on return.
            body: Their JSON array.
            key: The batch's Idempotency-Key (halves of a refused batch get new ones).
        """
        # stack of (events, body, idempotency key) still to send, the next one last
        pending = [(events, body, key)]
        while pending:
            part, part_body, part_key = pending.pop()
            try:
                outcome = await self._attempts(part, part_body, part_key)
            except anyio.get_cancelled_exc_class():
                for rest, rest_body, rest_key in pending:
                    self._give_up(ShutdownError(_SHUTDOWN_MESSAGE, rest), rest_body, rest_key)
                raise
            if outcome is _Outcome.SPLIT:
                half = len(part) // 2
                for piece in (part[half:], part[:half]):  # every event here encoded before
                    pending.append((piece, encoder.encode(piece), new_idempotency_key()))

    def _settle_failed(self, error: DeliveryError) -> None:
        self._ledger.in_flight -= len(error.events)
        self._report(error)

    async def _wait_pause(self) -> None:
        # a loop, not one sleep: another 429 may push the pause further meanwhile
        while (delay := self._paused_until - time.monotonic()) > 0:  # noqa: ASYNC110
            await anyio.sleep(delay)

    async def _attempts(self, events: list[Event], body: bytes, key: str) -> _Outcome:
        ledger = self._ledger
        started = time.monotonic()
        attempt = 0
        try:
            while True:
                await self._wait_pause()
                attempt += 1
                ledger.requests += 1
                if attempt > 1:
                    ledger.retries += 1
                try:
                    response: Response | None = await self._transport.post(body, key)
                except TransportFailure as exc:
                    response, failure = None, str(exc)
                if response is not None:
                    status = response.status
                    if 200 <= status < 300:
                        ledger.in_flight -= len(events)
                        ledger.delivered += len(events)
                        return _Outcome.SETTLED
                    failure = f"HTTP {status}: {response.message}"
                    if status in (400, 413) and len(events) > 1:
                        logger.debug("%s for %d events; splitting", failure, len(events))
                        return _Outcome.SPLIT
                    if status in (401, 403):
                        self._settle_failed(
                            AuthenticationError(
                                f"the API key was refused ({failure})",
                                events,
                                status=status,
                                server_message=response.message,
                            )
                        )
                        return _Outcome.SETTLED
                    if status not in RETRYABLE_STATUSES:
                        self._settle_failed(
                            RejectedError(
                                f"the server rejected {len(events)} event(s) ({failure})",
                                events,
                                status=status,
                                server_message=response.message,
                            )
                        )
                        return _Outcome.SETTLED
                if response is not None and response.retry_after is not None:
                    delay = response.retry_after
                else:
                    delay = backoff_delay(attempt, self._base_delay, self._max_delay)
                elapsed = time.monotonic() - started
                if attempt >= self._max_attempts or elapsed + delay > self._max_retry_time:
                    self._give_up(
                        RetriesExhaustedError(
                            f"gave up after {attempt} attempt(s) in {elapsed:.1f} s; "
                            f"last: {failure}",
                            events,
                            status=None if response is None else response.status,
                            server_message=None if response is None else response.message,
                        ),
                        body,
                        key,
                    )
                    return _Outcome.SETTLED
                if response is not None and (
                    response.status == 429 or response.retry_after is not None
                ):
                    self._paused_until = max(self._paused_until, time.monotonic() + delay)
                logger.debug("%s; retry %d in %.3f s", failure, attempt, delay)
                await anyio.sleep(delay)
        except anyio.get_cancelled_exc_class():
            # Cancelled at the close deadline: these events are given up here, at the
            # one place that knows they are unsettled, then the cancel goes on.
            self._give_up(ShutdownError(_SHUTDOWN_MESSAGE, events), body, key)
            raise
