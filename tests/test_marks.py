"""Delivery receipts over real HTTP: `Tracker.mark()`, `Mark.settled()`, and the receipt
`flush()` returns. The same property holds on virtual time in tests/sim.py
(`Sim.check_receipts`, over every seed of tests/test_simulation.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from lehnz_async import BlockingCallError, Receipt, RetryPolicy, Tracker
from lehnz_async.testing import Fault, FaultPlan, ReferenceServer

from .conftest import Errors, track_many

MakeTracker = Callable[..., Tracker]

pytestmark = pytest.mark.anyio


async def test_a_mark_settles_without_forcing_a_cut(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    tracker = make_tracker(flush_interval=0.3, max_batch_size=100)
    track_many(tracker, 250)
    mark = tracker.mark()
    assert not mark.done and mark.events == 250
    receipt = await mark.settled(timeout=10)
    assert receipt == Receipt(250, 250, 0, 0, 0, 0, 0) and receipt.ok_to_ack
    assert mark.done and len(server.events) == 250
    # batches were cut as usual: two full ones, then the rest at the interval
    sizes = sorted(r.n_events for r in server.requests if r.status == 202)
    assert sizes[-2:] == [100, 100], sizes


async def test_windows_count_only_their_own_events(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    """Each mark ends a window since the previous one; a rejected event (400) counts as
    failed in its own window only, and a before_send that drops counts as filtered."""
    server.faults = FaultPlan(reject_event=lambda e: "bad" if e.get("item_id") == "bad" else None)

    def scrub(event: Any) -> Any:
        return None if event.item_id == "bot" else event

    tracker = make_tracker(flush_interval=0.05, before_send=scrub)
    track_many(tracker, 30)
    first = tracker.mark()
    track_many(tracker, 10, start=30)
    tracker.track("usr_x", "view", item_id="bad")
    tracker.track("usr_y", "view", item_id="bot")
    second = tracker.mark()
    third = tracker.mark()  # an empty window
    one, two, three = await asyncio.gather(first.settled(10), second.settled(10), third.settled(10))
    assert one == Receipt(30, 30, 0, 0, 0, 0, 0)
    assert two == Receipt(12, 10, 1, 0, 1, 0, 0) and two.ok_to_ack
    assert three == Receipt(0, 0, 0, 0, 0, 0, 0)
    assert [e.item_id for e in errors.events] == ["bad"]


async def test_flush_returns_the_receipt_of_its_window(make_tracker: MakeTracker) -> None:
    tracker = make_tracker()
    track_many(tracker, 7)
    tracker.mark()
    track_many(tracker, 5, start=7)
    assert await tracker.flush(timeout=10) == Receipt(5, 5, 0, 0, 0, 0, 0)
    assert await tracker.flush() == Receipt(0, 0, 0, 0, 0, 0, 0)


async def test_what_close_gives_up_is_unsent_and_not_ok_to_ack(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    """The server is down until close: the close deadline gives the events up
    (ShutdownError), so a worker must not acknowledge them; events tracked after close
    count as unsent too (refused at the door)."""
    server.faults = FaultPlan(random_faults=[(1.0, Fault(503))])
    tracker = make_tracker(
        close_timeout=0.5, retry=RetryPolicy(max_attempts=1000, base_delay=0.01, max_delay=0.05)
    )
    track_many(tracker, 20)
    mark = tracker.mark()
    await tracker.aclose()
    receipt = await mark.settled(timeout=5)
    assert receipt == Receipt(20, 0, 0, 0, 0, 0, 20) and not receipt.ok_to_ack
    tracker.track("usr_late", "view")
    late = await tracker.flush()
    assert late == Receipt(1, 0, 0, 0, 0, 0, 1)


async def test_a_mark_that_cannot_settle_times_out_and_can_be_awaited_again(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    server.faults = FaultPlan(random_faults=[(1.0, Fault(503))])
    tracker = make_tracker(outage_grace=0.1)
    track_many(tracker, 3)
    mark = tracker.mark()
    with pytest.raises(TimeoutError, match=r"did not all settle within 0\.3 s"):
        await mark.settled(timeout=0.3)
    server.faults = FaultPlan()
    assert (await mark.settled(timeout=20)).delivered == 3


def test_marks_from_threads_hold_exactly_their_events(threaded_server: ReferenceServer) -> None:
    """Four threads track and mark at once into one tracker on its own loop thread:
    the windows add up to every event, and each thread's mark settles (blocking form)."""
    tracker = Tracker(threaded_server.api_key, endpoint=threaded_server.url, flush_interval=0.02)
    receipts: list[Receipt] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        for round_ in range(20):
            for i in range(50):
                tracker.track(f"usr_{k}_{round_}_{i}", "view")
            receipt = tracker.mark().settled_sync(timeout=20)
            with lock:
                receipts.append(receipt)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    tracker.close()
    assert len(receipts) == 80
    assert sum(r.events for r in receipts) == sum(r.delivered for r in receipts) == 4000
    assert len(threaded_server.events) == 4000


async def test_settled_sync_on_the_trackers_own_loop_is_refused(
    make_tracker: MakeTracker,
) -> None:
    tracker = make_tracker()
    tracker.track("usr_1", "view")
    with pytest.raises(BlockingCallError, match=r"await mark.settled\(\)"):
        tracker.mark().settled_sync(timeout=1)
