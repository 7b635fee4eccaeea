"""The tracker's counters: one ledger, read as a typed `Stats` snapshot."""

from __future__ import annotations

from typing import NamedTuple


class Stats(NamedTuple):
    """A snapshot of a tracker's counters.

    At every moment
    ``tracked == delivered + failed + dropped + queued + in_flight + spooled``; the
    backlog is ``queued + in_flight`` events.
    """

    #: Events accepted by track()/identify() (invalid calls raise and are not counted),
    #: and events re-sent from the spool when the tracker started.
    tracked: int
    #: Events the server acknowledged with a 2xx.
    delivered: int
    #: Events reported to on_error (rejected, unencodable, out of retries, shut down).
    failed: int
    #: Events discarded because the queue was full (counted and logged, not reported).
    dropped: int
    #: Events waiting in the queue.
    queued: int
    #: Events cut into batches that are not settled yet (sending or waiting to retry).
    in_flight: int
    #: Events written to the spool file, to be re-sent when a tracker next starts.
    spooled: int
    #: Batches cut from the queue.
    batches: int
    #: HTTP requests made, retries and split halves included.
    requests: int
    #: Requests that were retries of an earlier failed attempt.
    retries: int
    #: "healthy", or "outage" while the ingestion endpoint is failing (see the README).
    state: str = "healthy"
    #: Outages so far.
    outages: int = 0
    #: Bytes the queued and in-flight events are reckoned to hold in memory (what
    #: ``max_buffer_bytes`` bounds); batches spilled to the spool hold none.
    backlog_bytes: int = 0
    #: Dropped events by reason: ``max_queue_size``, ``max_buffer_bytes``,
    #: ``max_event_age``, ``max_spool_bytes``, ``unreadable_spool_row``.
    drops: dict[str, int] = {}  # noqa: RUF012 - a NamedTuple default, never mutated
    #: Why the spool was set aside (it could not be opened, read or written), if it was:
    #: the tracker then runs on without one. Empty while it works, or with no spool.
    spool_error: str = ""
    #: Unexpected exceptions (bugs) that a part of the engine caught and survived: the
    #: batches in hand were failed with the exception as the cause, and it carried on.
    internal_errors: int = 0
