"""Freezing: events that wait in the queue let go of their caller's context dict (issue
19). Over real loopback HTTP: the dict is released while its event still waits, the
server gets the same JSON, on_error gets dicts back, a before_send hook and an
unencodable context keep theirs, and producer threads lose nothing."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from lehnz_async import EncodeError, Event, Tracker
from lehnz_async._buffer import FREEZE_EVERY
from lehnz_async.testing import FaultPlan, ReferenceServer

from .conftest import Errors, assert_ledger

pytestmark = pytest.mark.anyio

MakeTracker = Callable[..., Tracker]
HOLD = 3600.0  # a flush interval that never ends a test's batch on its own


async def settle_loop() -> None:
    """Let the loop run what track() scheduled (a freeze is a call on the loop)."""
    for _ in range(3):
        await asyncio.sleep(0)


def contexts(n: int) -> list[dict[str, Any]]:
    return [{"page": "home", "position": i, "tags": ["a", "b"], "z": None} for i in range(n)]


async def test_a_waiting_event_lets_go_of_its_context_dict(
    make_tracker: MakeTracker, server: ReferenceServer
) -> None:
    tracker = make_tracker(flush_interval=HOLD)
    await tracker.start()
    ctxs = contexts(FREEZE_EVERY * 2)
    refs = lambda: [sys.getrefcount(ctx) for ctx in ctxs[:FREEZE_EVERY]]  # noqa: E731
    alone = refs()  # the list's references and the call's
    for i, ctx in enumerate(ctxs):
        tracker.track(f"usr_{i}", "view", item_id="prod_1", context=ctx)
    await settle_loop()
    assert tracker.stats.queued == len(ctxs)  # nothing was cut: every event still waits
    assert refs() == alone  # no longer held by the tracker
    receipt = await tracker.flush()
    assert receipt.delivered == len(ctxs)
    assert [e["context"] for e in server.events] == ctxs  # the same JSON, as if not frozen


async def test_on_error_gets_each_context_back_as_a_dict(
    make_tracker: MakeTracker, server: ReferenceServer, errors: Errors
) -> None:
    tracker = make_tracker(flush_interval=HOLD)
    await tracker.start()
    server.revoke(server.api_key)  # every batch is refused: 401
    ctxs = contexts(FREEZE_EVERY + 5)
    for i, ctx in enumerate(ctxs):
        tracker.track(f"usr_{i}", "view", context=ctx)
    await settle_loop()
    await tracker.flush()
    assert [e.context for e in errors.events] == ctxs
    assert all(type(e.context) is dict for e in errors.events)


async def test_a_before_send_hook_sees_dicts_and_nothing_is_frozen(
    make_tracker: MakeTracker, server: ReferenceServer
) -> None:
    seen: list[object] = []

    def hook(event: Event) -> Event:
        seen.append(event.context)
        return event

    tracker = make_tracker(flush_interval=HOLD, before_send=hook)
    await tracker.start()
    ctxs = contexts(FREEZE_EVERY * 2)
    for i, ctx in enumerate(ctxs):
        tracker.track(f"usr_{i}", "view", context=ctx)
    await settle_loop()
    assert all(sys.getrefcount(ctx) > 2 for ctx in ctxs)  # still held: never frozen
    await tracker.flush()
    assert seen == ctxs and all(type(c) is dict for c in seen)
    assert [e["context"] for e in server.events] == ctxs


async def test_an_unencodable_context_stays_a_dict_and_fails_alone(
    make_tracker: MakeTracker, server: ReferenceServer, errors: Errors
) -> None:
    tracker = make_tracker(flush_interval=HOLD)
    await tracker.start()
    bad = {"when": object()}
    for i in range(FREEZE_EVERY * 2):
        tracker.track(f"usr_{i}", "view", context=bad if i == 7 else {"i": i})
    await settle_loop()
    await tracker.flush()
    assert len(server.events) == FREEZE_EVERY * 2 - 1
    [error] = errors
    assert isinstance(error, EncodeError) and "context['when']" in str(error)
    assert error.events[0].context is bad


async def test_producer_threads_lose_nothing_while_the_loop_freezes(
    make_tracker: MakeTracker, server: ReferenceServer
) -> None:
    tracker = make_tracker(flush_interval=0.05)
    await tracker.start()
    per_thread, threads = 3_000, 4

    def produce(t: int) -> None:
        for i in range(per_thread):
            tracker.track(f"usr_{t}_{i}", "view", context={"t": t, "i": i})

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:  # the loop runs meanwhile: the freezes the threads schedule
        await anyio.to_thread.run_sync(w.join)
    receipt = await tracker.flush()
    assert receipt.delivered == per_thread * threads
    got = sorted((e["context"]["t"], e["context"]["i"]) for e in server.events)
    assert got == [(t, i) for t in range(threads) for i in range(per_thread)]
    assert_ledger(tracker.stats)


async def test_a_bug_in_the_freezer_costs_no_event(
    make_tracker: MakeTracker, server: ReferenceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure of one part: the freezer raises half way, after moving the events; it is
    counted once as an internal error, and every event is delivered unfrozen."""
    from lehnz_async import _buffer

    def broken(self: _buffer.Buffer) -> None:
        self.staged.extend(self.events)  # the events moved, as the real one moves them
        self.events.clear()
        raise RuntimeError("a bug in the freezer")

    monkeypatch.setattr(_buffer.Buffer, "freeze_waiting", broken)
    tracker = make_tracker(flush_interval=HOLD)
    await tracker.start()
    for i in range(FREEZE_EVERY * 3):
        tracker.track(f"usr_{i}", "view", context={"i": i})
        if i % 50 == 0:
            await settle_loop()
    receipt = await tracker.flush()
    assert receipt.delivered == FREEZE_EVERY * 3
    assert tracker.stats.internal_errors >= 1
    assert sorted(e["context"]["i"] for e in server.events) == list(range(FREEZE_EVERY * 3))


async def test_events_piling_up_behind_busy_workers_are_frozen(
    make_tracker: MakeTracker, server: ReferenceServer
) -> None:
    """A slow server holds the one worker: what waits grows past a batch and is frozen
    (a full batch is only left unfrozen when a worker is free to take it at once)."""
    server.faults = FaultPlan(latency=0.5)
    tracker = make_tracker(flush_interval=HOLD, max_batch_size=100, max_concurrent_requests=1)
    await tracker.start()
    ctxs = contexts(600)
    refs = lambda: [sys.getrefcount(ctx) for ctx in ctxs[200:500]]  # noqa: E731
    alone = refs()  # tracked while the worker is busy: the list's references only
    for i, ctx in enumerate(ctxs):
        tracker.track(f"usr_{i}", "view", context=ctx)
        if i % 50 == 49:
            await settle_loop()
    assert tracker.stats.queued >= 400  # one batch in flight, the rest waits
    assert refs() == alone
    receipt = await tracker.flush()
    assert receipt.delivered == 600
    assert [e["context"] for e in server.events] == ctxs
