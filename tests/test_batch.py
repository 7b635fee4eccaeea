"""Cutting the queue into batches by count and bytes (no I/O)."""

from __future__ import annotations

from collections import deque

import msgspec

from lehnz_async._batch import cut
from lehnz_async._event import Event, build_event


def events(n: int, context_bytes: int = 0) -> deque[Event]:
    ctx = {"blob": "x" * context_bytes} if context_bytes else None
    return deque(build_event(f"u{i}", "view", context=ctx) for i in range(n))


def test_cut_by_count_in_order() -> None:
    queue = events(7)
    first = cut(queue, 5, 10_000)
    assert first is not None
    assert [e.user_id for e in first.events] == ["u0", "u1", "u2", "u3", "u4"]
    assert msgspec.json.decode(first.body)[4]["user_id"] == "u4"
    second = cut(queue, 5, 10_000)
    assert second is not None and len(second.events) == 2
    assert cut(queue, 5, 10_000) is None


def test_cut_by_bytes_puts_the_rest_back_in_order() -> None:
    queue = events(50, context_bytes=200)
    sizes = []
    seen = []
    while (batch := cut(queue, 500, 2_000)) is not None:
        assert len(batch.body) <= 2_000
        sizes.append(len(batch.events))
        seen.extend(e.user_id for e in batch.events)
    assert seen == [f"u{i}" for i in range(50)]
    assert max(sizes) > 1


def test_an_event_larger_than_the_bound_goes_alone() -> None:
    queue = events(3, context_bytes=5_000)
    batch = cut(queue, 500, 1_000)
    assert batch is not None and len(batch.events) == 1 and len(batch.body) > 1_000
    assert len(queue) == 2


def test_unencodable_events_are_set_aside_not_the_batch() -> None:
    queue = events(5)
    bad = build_event("bad", "view", context={"when": object()})
    queue.insert(2, bad)
    batch = cut(queue, 500, 10_000)
    assert batch is not None
    assert [e.user_id for e in batch.events] == ["u0", "u1", "u2", "u3", "u4"]
    assert [(e.user_id, "object" in reason) for e, reason in batch.unencodable] == [("bad", True)]
