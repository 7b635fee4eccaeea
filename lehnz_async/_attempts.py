"""One batch's attempt, and what its answer decides: the sender's decisions, apart from
its workers.

`Attempts.attempt` sends a batch once and returns its next step: settled in the ledger
(delivered, or failed for good), split into halves with derived keys, backing off in
the backlog until a due time, or parked for an outage. It holds no batch between calls;
the sender's one path (`Sender._process`) does, and acts on the step.

Failures are contained by scope:

- a *batch*: retryable failures are retried with full-jitter backoff inside the
  `RetryPolicy`; a batch refused as a whole (400/413) is split into halves with derived
  keys; a batch that keeps getting 5xx while other batches are accepted holds a poison
  event, and is bisected at once, so that its good events go and the poison one is
  finally given up (`RetriesExhaustedError`, or the spool) on its own. (Not if an
  attempt may have stored it, a timeout or a lost answer: halves have new keys, so the
  server could store their events twice. Such a batch is retried and given up whole.)
- the *destination*: only evidence across batches (see `Destination`) starts an outage
  (``outage_began``); any answer that shows the service up ends it (``outage_ended``).
  A 429 or a ``Retry-After`` pauses every request, not only the batch told to wait.
- the *configuration*: before the endpoint has ever answered, what looks misconfigured
  (a 404, a host name that does not resolve, ``https://`` against a plain-HTTP port) is
  logged at once, as an ERROR.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import anyio

from ._batch import Batch
from ._exceptions import AuthenticationError, DeliveryError, RejectedError, RetriesExhaustedError
from ._health import Destination
from ._ledger import Fate, Ledger
from ._retry import RETRYABLE_STATUSES, RetryPolicy
from ._transport import BatchTransport, Response, TransportFailure

logger = logging.getLogger("lehnz_async")

#: Consecutive 5xx answers to one batch, while others are accepted, before it is
#: bisected as holding a poison event.
POISON_AFTER = 2
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


#: An outage: the batch waits in the backlog, neither retried nor given up.
PARK = object()


class Backoff:
    """A retryable failure within the budget: retry at ``due`` (loop time)."""

    __slots__ = ("due",)

    def __init__(self, due: float) -> None:
        self.due = due


class Attempts:
    """Attempts batches, one request at a time, and decides each one's next step.

    Args:
        transport: Where to POST.
        ledger: Where batches are settled.
        policy: The retry policy.
        rng: The source of backoff jitter (seeded in the simulation).
        destination: The endpoint's health, shared with later runs.
        endpoint: The ingestion URL, named in messages about misconfiguration.
        outage_began: Called when a failure starts an outage (the sender starts probing).
        outage_ended: Called when an answer ends an outage (the sender resumes).
    """

    def __init__(
        self,
        transport: BatchTransport,
        ledger: Ledger,
        policy: RetryPolicy,
        rng: random.Random,
        destination: Destination,
        endpoint: str,
        outage_began: Callable[[], None],
        outage_ended: Callable[[], None],
    ) -> None:
        self._transport = transport
        self._ledger = ledger
        self._policy = policy
        self._rng = rng
        self.destination = destination
        self._endpoint = endpoint
        self._outage_began = outage_began
        self._outage_ended = outage_ended
        # loop time before which no request may start: set by 429 / Retry-After, so
        # that during a rate limit the whole sender waits, not just the batch told to
        self._paused_until = 0.0
        #: Retry-After of the last probe's answer: the next probe waits at least that
        self.probe_wait = 0.0
        self._misconfig_logged: set[str] = set()

    async def wait_pause(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait out a pause set by a 429 or a ``Retry-After``."""
        # a loop, not one sleep: another 429 may push the pause further meanwhile. A
        # timer may fire up to the clock's resolution early: what is left below a
        # millisecond counts as done, or the loop could spin without time moving.
        while (delay := self._paused_until - loop.time()) > 0.001:  # noqa: ASYNC110
            await anyio.sleep(delay)

    async def attempt(self, part: Batch, probe: bool) -> tuple[Batch, Batch] | object | None:
        """Attempt ``part`` once: it is settled (None), must be split (its halves), must
        back off before its next attempt (`Backoff`, in the backlog, not in a worker's
        hand), or must wait out an outage (`PARK`). With ``probe``, a retryable failure
        parks it again."""
        policy, dest = self._policy, self.destination
        loop = asyncio.get_running_loop()
        if dest.outage and not probe:
            return PARK
        if self._paused_until > loop.time():  # a 429 or Retry-After paused the sender
            await self.wait_pause(loop)
            if dest.outage and not probe:
                return PARK
        outcome = await self._request(part)
        if not isinstance(outcome, _Retry):
            return outcome
        part.last_failure = outcome.failure
        if probe:
            logger.debug("outage probe: %s", outcome.failure)
            self.probe_wait = outcome.delay or 0.0  # Retry-After rules
            return PARK
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
            self._outage_began()
            return PARK
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
        return Backoff(loop.time() + delay)

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

    async def _request(self, part: Batch) -> tuple[Batch, Batch] | _Retry | None:
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
        if 200 <= status < 300:
            if dest.answered(loop.time(), accepted=True):  # up again
                self._outage_ended()
            ledger.settle(part, Fate.DELIVERED)
            return None
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
        if dest.answered(loop.time()):  # up again (answered, if not accepted)
            self._outage_ended()
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
