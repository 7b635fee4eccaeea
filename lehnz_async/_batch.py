"""The one shape of a batch, and cutting the queue into batches; no I/O.

A `Batch` is made once, when its events leave the queue (or when a spooled row is read
back), and keeps its events, its exact JSON body and its ``Idempotency-Key`` for its
whole life: retries, a re-queue after a torn-down loop, the spool and its replay all send
the same bytes under the same key, so a de-duplicating server stores it once. The halves
of a bisected batch get keys derived from their parent's (``<key>.0``, ``<key>.1``), so a
replayed spool row bisects into the very keys it did before.

A batch is at most ``max_events`` events whose JSON array is at most ``max_bytes``
(a single event larger than that is still sent alone: only the server knows its limit).
Events msgspec cannot encode are taken out and returned separately, so that one bad
``context`` never takes the rest of its batch down.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Callable
from itertools import repeat, starmap
from typing import NamedTuple

from ._event import Event, context_fault, encoder

#: Bytes an event is reckoned to take in memory beyond its JSON: measured with
#: ``/proc/self/status`` over 200,000 events (410 B in memory for 129 B of JSON) and
#: 20,000 events with 10 KB contexts (10,480 B for 10,123 B).
EVENT_OVERHEAD = 300


class Fate(enum.Enum):
    """How a batch ends."""

    DELIVERED = "delivered"
    FAILED = "failed"  # reported to on_error
    SPOOLED = "spooled"  # written to the spool, to be sent by a later tracker
    DROPPED = "dropped"  # counted with a reason (older than max_event_age)


def memory_size(body_size: int, n: int) -> int:
    """What a batch of ``n`` events and a ``body_size``-byte body holds in memory: the
    events (their JSON size plus the overhead of the objects) and the body."""
    return 2 * body_size + EVENT_OVERHEAD * n


def new_key() -> str:
    """A fresh Idempotency-Key: 128 random bits, like a uuid4, for a fifth of the cost."""
    return os.urandom(16).hex()


class Batch:
    """Events on their way, with their body and key; settled exactly once (see `Ledger`).

    Attributes:
        events: The events, oldest first.
        body: Their JSON array, exactly as POSTed.
        key: The Idempotency-Key, the same on every attempt, re-queue and replay.
        root: The sequence number of the first event of the batch this one was cut as
            (halves keep their parent's), the ledger's handle on it.
        spool_id: The spool row it is a copy of, if it was read back whole from the spool
            (its halves are not).
        n: How many events it holds (also while spilled).
        mem: The bytes it is reckoned to hold in memory (its events and its body).
        spill_row: The spool row it was spilled to during an outage, while its events and
            body are on disk only (``events`` is then empty).
        attempts: Requests made for it so far.
        first_attempt: Loop time of its first request (for the retry time budget).
        settled: Set by the ledger when its fate is decided; never unset.
        state: Where it is in the `Backlog` (``ready``, ``sending``, ``parked``), or
            ``""`` outside it.
        failures_5xx: Consecutive 5xx answers to it (0 after any other outcome).
        others_ok: The destination's count of 2xx answers when its current streak of
            5xx answers began: if other batches were accepted since, the fault is in
            this batch (a poison event), not in the service.
        maybe_sent: An attempt ended with no answer after the request may have reached
            the server (a timeout, a dropped connection), so it may be stored already.
        replayed: It was read back from the spool (or is a half of such a batch): it
            was given up once already.
    """

    __slots__ = (
        "attempts",
        "body",
        "events",
        "failures_5xx",
        "first_attempt",
        "key",
        "last_failure",
        "maybe_sent",
        "mem",
        "n",
        "others_ok",
        "replayed",
        "root",
        "seq",
        "settled",
        "spill_row",
        "spool_id",
        "state",
    )

    def __init__(
        self,
        events: list[Event],
        body: bytes,
        key: str,
        root: int,
        spool_id: int | None = None,
    ) -> None:
        self.events = events
        self.body = body
        self.key = key
        self.root = root
        #: the queue sequence number of its first event (set when the ledger opens it;
        #: -1 for events re-sent from the spool), for `Tracker.mark`'s windows
        self.seq = -1
        self.spool_id = spool_id
        self.n = len(events)
        self.mem = memory_size(len(body), self.n)
        self.spill_row: int | None = None
        self.attempts = 0
        self.first_attempt: float | None = None
        self.settled = False
        self.state = ""
        self.failures_5xx = 0
        self.others_ok = 0
        self.maybe_sent = False
        #: how its last attempt failed ("connection refused", "HTTP 503"...), or ""
        self.last_failure = ""
        self.replayed = spool_id is not None

    def __len__(self) -> int:
        return self.n

    def split(self) -> tuple[Batch, Batch]:
        """The two halves, each re-encoded, with keys derived from this batch's key.

        Every event here was encoded once already, so encoding a half cannot fail.
        """
        half = len(self.events) // 2
        first, second = self.events[:half], self.events[half:]
        halves = (
            Batch(first, encoder.encode(first), f"{self.key}.0", self.root),
            Batch(second, encoder.encode(second), f"{self.key}.1", self.root),
        )
        # the ledger counted this batch's memory once: the halves share it out
        halves[0].mem = self.mem * half // len(self.events)
        halves[1].mem = self.mem - halves[0].mem
        if self.seq >= 0:
            halves[0].seq, halves[1].seq = self.seq, self.seq + half
        for part in halves:
            part.maybe_sent = self.maybe_sent
            part.replayed = self.replayed
        return halves

    def __repr__(self) -> str:
        return f"<Batch {len(self.events)} events key={self.key} root={self.root}>"


class Cut(NamedTuple):
    """One batch's worth of events taken from the queue."""

    #: The events of the batch, oldest first; may be empty if all were unencodable.
    events: list[Event]
    #: Their JSON array, exactly as it will be POSTed.
    body: bytes
    #: Events that could not be encoded, with the reason.
    unencodable: list[tuple[Event, str]]


def encode_each(events: list[Event]) -> tuple[list[Event], list[tuple[Event, str]]]:
    """Split events into those that encode and those that do not (with the reason, which
    names the part of the context at fault)."""
    good: list[Event] = []
    bad: list[tuple[Event, str]] = []
    for event in events:
        fault = context_fault(event.context)
        if fault is None:
            try:
                encoder.encode(event)
            except Exception as exc:  # msgspec raises TypeError, ValueError, OverflowError...
                fault = f"{type(exc).__name__}: {exc}"
        if fault is None:
            good.append(event)
        else:
            bad.append((event, fault))
    return good, bad


def encode(events: list[Event]) -> tuple[list[Event], bytes, list[tuple[Event, str]]]:
    """Encode events as one JSON array, leaving out (and returning) those JSON cannot
    carry: a value msgspec refuses, a key that is not a str (the common case, all
    encodable, costs one call)."""
    try:
        return events, encoder.encode(events), []
    except Exception:
        good, bad = encode_each(events)
        return good, encoder.encode(good), bad


def cut(
    queue: deque[Event],
    max_events: int,
    max_bytes: int,
    staged: deque[Event] | None = None,
    prepare: Callable[[list[Event]], list[Event]] | None = None,
    max_taken: int | None = None,
) -> Cut | None:
    """Take the next batch from the left of ``queue``; None if nothing is left.

    ``prepare`` (the ``before_send`` hook) is applied to events as they leave ``queue``;
    events beyond the byte bound go back, in order, to the left of ``staged`` (already
    prepared, taken first next time), or of ``queue`` when there is no ``staged``.
    ``max_taken`` bounds the events taken off ``staged`` and ``queue`` together, those
    ``prepare`` leaves out included (a window of `Tracker.mark` ends there).
    """
    events: list[Event] = []
    left = max_events if max_taken is None else min(max_events, max_taken)
    if staged:
        events = list(starmap(staged.popleft, repeat((), min(len(staged), left))))
        left -= len(events)
    while len(events) < max_events and queue and left > 0:
        # popleft() n times, from C: safe against appends from other threads meanwhile
        n = min(len(queue), max_events - len(events), left)
        taken = list(starmap(queue.popleft, repeat((), n)))
        left -= n
        events += taken if prepare is None else prepare(taken)
    if not events:
        return None
    events, body, unencodable = encode(events)
    back = queue if staged is None else staged
    while len(body) > max_bytes and len(events) > 1:
        # Keep the share that should fit, judging by the average event size, and try again.
        keep = max(1, min(len(events) - 1, len(events) * max_bytes // len(body)))
        back.extendleft(reversed(events[keep:]))
        events = events[:keep]
        body = encoder.encode(events)
    return Cut(events, body, unencodable)
