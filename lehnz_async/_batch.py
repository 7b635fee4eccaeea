"""Cutting the queue into batches; no I/O, so it is tested synchronously.

A batch is at most ``max_events`` events whose JSON array is at most ``max_bytes``
(a single event larger than that is still sent alone: only the server knows its limit).
Events msgspec cannot encode are taken out and returned separately, so that one bad
``context`` never takes the rest of its batch down.
"""

from __future__ import annotations

from collections import deque
from itertools import repeat, starmap
from typing import NamedTuple

from ._event import Event, encoder


class Cut(NamedTuple):
    """One batch taken from the queue."""

    #: The events of the batch, oldest first; may be empty if all were unencodable.
    events: list[Event]
    #: Their JSON array, exactly as it will be POSTed.
    body: bytes
    #: Events that could not be encoded, with the reason.
    unencodable: list[tuple[Event, str]]


def encode_each(events: list[Event]) -> tuple[list[Event], list[tuple[Event, str]]]:
    """Split events into those that encode and those that do not (with the reason)."""
    good: list[Event] = []
    bad: list[tuple[Event, str]] = []
    for event in events:
        try:
            encoder.encode(event)
        except Exception as exc:  # msgspec raises TypeError, ValueError, OverflowError...
            bad.append((event, f"{type(exc).__name__}: {exc}"))
        else:
            good.append(event)
    return good, bad


def encode(events: list[Event]) -> tuple[list[Event], bytes, list[tuple[Event, str]]]:
    """Encode events as one JSON array, leaving out (and returning) unencodable ones."""
    try:
        return events, encoder.encode(events), []
    except Exception:
        good, bad = encode_each(events)
        return good, encoder.encode(good), bad


def cut(queue: deque[Event], max_events: int, max_bytes: int) -> Cut | None:
    """Take the next batch from the left of ``queue``; None if the queue is empty.

    Events beyond the byte bound are put back at the left, in order.
    """
    n = min(len(queue), max_events)
    if n == 0:
        return None
    # popleft() n times, from C: safe against appends from other threads meanwhile
    events = list(starmap(queue.popleft, repeat((), n)))
    events, body, unencodable = encode(events)
    while len(body) > max_bytes and len(events) > 1:
        # Keep the share that should fit, judging by the average event size, and try again.
        keep = max(1, min(len(events) - 1, len(events) * max_bytes // len(body)))
        queue.extendleft(reversed(events[keep:]))
        events = events[:keep]
        body = encoder.encode(events)
    return Cut(events, body, unencodable)
