"""The tracker's counters: one ledger, read as a typed `Stats` snapshot."""

from __future__ import annotations

from typing import NamedTuple


class Stats(NamedTuple):
    """A snapshot of a tracker's counters.

    At every moment
    ``tracked == delivered + failed + dropped + queued + in_flight + spooled``.
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


class Ledger:
    """Mutable counters shared by the tracker and its sender (loop thread only)."""

    __slots__ = (
        "batches",
        "delivered",
        "discarded",
        "dropped",
        "failed",
        "in_flight",
        "requests",
        "retries",
        "spooled",
        "taken",
    )

    def __init__(self) -> None:
        self.taken = 0  # events moved from the queue into batches
        self.discarded = 0  # events failed or dropped without ever being taken
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.in_flight = 0
        self.spooled = 0
        self.batches = 0
        self.requests = 0
        self.retries = 0
