"""The destination's health: one state for the whole tracker, not one per batch.

An outage is a state of the destination, and it takes evidence across batches: a streak
of retryable failures (transport errors, 408/429/5xx) with no answer that shows the
service up, from at least two different batches, or one connection that could not be
made at all (refused, a name that does not resolve), that lasts past ``outage_grace``
seconds or would otherwise exhaust a batch's retry budget, puts the tracker into an
*outage*. One batch failing while others are accepted (a poison event the server always
answers 500) is that batch's failure, never the destination's: it is retried, bisected
and finally given up in its own scope (see `Sender`).

During an outage no batch gives up and no new batch is cut: the senders park what they
hold, events wait in the buffer (under its byte budget, spilling to the spool if there is
one), and a single probe, a real parked batch (each in turn), is sent with exponential
backoff and jitter capped at ``probe_max_delay``. Any HTTP answer
that is not a retryable failure (2xx, or a 4xx that says the service is up) ends the
outage, and every slot resumes, oldest batches first.

A ``413`` teaches the tracker the largest body the way to the service accepts: later
batches are cut below it (`body_limit`).
"""

from __future__ import annotations

import logging

from ._ledger import Ledger

logger = logging.getLogger("lehnz_async")


class Destination:
    """The ingestion endpoint as the tracker sees it; kept across runs of the flusher.

    Args:
        grace: Seconds a streak of retryable failures may last before it is an outage;
            None turns outage mode off (batches give up on their retry policy alone).
        probe_max_delay: Cap of the backoff between two probes, in seconds.
        ledger: Where outages are counted.
    """

    def __init__(self, grace: float | None, probe_max_delay: float, ledger: Ledger) -> None:
        self.grace = grace
        self.probe_max_delay = probe_max_delay
        self._ledger = ledger
        #: loop time of the first retryable failure of the current streak, if any
        self.failing_since: float | None = None
        #: loop time the current outage began, if one is under way
        self.outage_since: float | None = None
        self.cause = ""
        #: 2xx answers so far: a batch failing while this grows is failing alone
        self.accepted = 0
        #: whether the endpoint has ever answered (misconfiguration is reported at once
        #: until it has)
        self.ever_answered = False
        # the batches (by root: halves are one batch) that failed in the current streak
        self._failing: set[int] = set()
        #: the largest body the way to the service was seen to accept, learnt from 413
        self.body_limit: int | None = None
        self._dropped_at_start = 0

    @property
    def outage(self) -> bool:
        return self.outage_since is not None

    def answered(self, now: float, accepted: bool = False) -> bool:
        """An answer that shows the service is up (``accepted``: a 2xx). True when it
        ends an outage."""
        self.failing_since = None
        self._failing.clear()
        self.ever_answered = True
        if accepted:
            self.accepted += 1
        if self.outage_since is None:
            return False
        duration = now - self.outage_since
        self.outage_since = None
        stats = self._ledger.stats(0)
        logger.warning(
            "ingestion endpoint back after an outage of %.1f s (%s): sending the backlog of "
            "%d event(s) in flight, %d dropped meanwhile",
            duration,
            self.cause,
            stats.in_flight,
            stats.dropped - self._dropped_at_start,
        )
        self._ledger.outage(False)
        return True

    def failed(
        self, now: float, cause: str, root: int, *, unreachable: bool, budget_spent: bool
    ) -> bool:
        """A retryable failure of the batch cut as ``root`` (or one of its halves). True
        when the tracker is (now) in an outage: the batch waits instead of retrying or
        giving up.

        ``unreachable``: no connection could be made (evidence on its own);
        ``budget_spent``: the batch's retry policy would give up now.
        """
        if self.grace is None:
            return False
        if self.failing_since is None:
            self.failing_since = now
        self._failing.add(root)
        evidence = unreachable or len(self._failing) >= 2
        if (
            self.outage_since is None
            and evidence
            and (budget_spent or now - self.failing_since >= self.grace)
        ):
            self.outage_since = now
            self.cause = cause
            self._dropped_at_start = self._ledger.dropped
            logger.warning(
                "ingestion endpoint failing for %.1f s (%s): outage mode, holding events "
                "and probing with one request at a time",
                now - self.failing_since,
                cause,
            )
            self._ledger.outage(True)
        return self.outage_since is not None

    def too_large(self, body_size: int) -> None:
        """A 413 for a body of ``body_size`` bytes: cut later batches below half of it."""
        limit = max(1, body_size // 2)
        if self.body_limit is None or limit < self.body_limit:
            self.body_limit = limit
            logger.info(
                "a body of %d bytes was refused (413): batches now stay below %d", body_size, limit
            )
