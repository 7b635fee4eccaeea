"""The Tracker against the reference server, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import anyio
import msgspec
import pytest

from lehnz_async import (
    AuthenticationError,
    EncodeError,
    RejectedError,
    RetriesExhaustedError,
    RetryPolicy,
    ShutdownError,
    Tracker,
    TrackerClosedError,
    __version__,
)
from lehnz_async.testing import FaultPlan, ReferenceServer

from .conftest import Errors, assert_ledger, track_many

pytestmark = pytest.mark.anyio

MakeTracker = Callable[..., Tracker]


# -- batching ---------------------------------------------------------------------------


async def test_full_batches_are_sent_without_waiting_for_the_interval(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    tracker = make_tracker(max_batch_size=10, flush_interval=3600)
    async with tracker:
        track_many(tracker, 35)
        await server.wait_for_events(30, timeout=5)
        assert sorted(r.n_events for r in server.requests) == [10, 10, 10]
        assert tracker.stats.queued == 5
        await tracker.flush()
    assert sorted(r.n_events for r in server.requests) == [5, 10, 10, 10]
    assert [e["user_id"] for e in server.events] != [] and len(server.events) == 35
    assert tracker.stats.batches == 4
    assert_ledger(tracker.stats)


async def test_a_partial_batch_is_sent_after_flush_interval(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    interval = 0.2
    tracker = make_tracker(flush_interval=interval)
    async with tracker:
        tracked_at = time.monotonic()
        track_many(tracker, 3)
        await server.wait_for_events(3, timeout=5)
    (request,) = server.requests
    assert request.n_events == 3
    # the flusher's first tick is one interval after start, and start preceded tracked_at
    assert request.received_at - tracked_at >= interval * 0.5


async def test_batches_stay_under_the_byte_bound(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    tracker = make_tracker(max_batch_bytes=2_000)
    async with tracker:
        track_many(tracker, 40, context={"note": "x" * 300})
    assert len(server.events) == 40
    assert len(server.requests) > 1
    assert all(len(r.body) <= 2_000 for r in server.requests)
    # batches in flight at once may reach the server in either order; each is in order
    assert sorted(e["user_id"] for e in server.events) == sorted(f"usr_{i}" for i in range(40))
    for request in server.requests:
        ids = [int(e["user_id"][4:]) for e in msgspec.json.decode(request.body)]
        assert ids == list(range(ids[0], ids[0] + len(ids)))


async def test_the_concurrency_bound_is_honoured_and_used(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    server.faults.latency = 0.2
    tracker = make_tracker(max_batch_size=5, max_concurrent_requests=3)
    async with tracker:
        track_many(tracker, 40)
        await tracker.flush()
    assert server.max_in_flight == 3
    assert len(server.requests) == 8 and len(server.events) == 40


# -- the wire ---------------------------------------------------------------------------


async def test_the_documented_example_goes_through_with_family_filled_in(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    async with make_tracker() as tracker:
        tracker.track("usr_1", "view", item_id="prod_1")
        tracker.track("usr_1", "add_to_cart", item_id="prod_1", context={"price": 49.99})
        tracker.track(
            "usr_1",
            "purchase",
            item_id="prod_1",
            context={"price": 49.99},
            recommendation_id="rec_9",
            session_id="s_1",
        )
        tracker.track("usr_1", "wishlist", event_family="engagement", item_id="prod_1")
        tracker.identify("usr_1", previous_user_id="anon_7f3")
    assert errors == []
    assert server.events == [
        {"user_id": "usr_1", "event_family": "engagement", "event_name": "view",
         "item_id": "prod_1"},
        {"user_id": "usr_1", "event_family": "engagement", "event_name": "add_to_cart",
         "item_id": "prod_1", "context": {"price": 49.99}},
        {"user_id": "usr_1", "event_family": "conversion", "event_name": "purchase",
         "item_id": "prod_1", "session_id": "s_1", "recommendation_id": "rec_9",
         "context": {"price": 49.99}},
        {"user_id": "usr_1", "event_family": "engagement", "event_name": "wishlist",
         "item_id": "prod_1"},
        {"user_id": "usr_1", "event_family": "system", "event_name": "identify",
         "previous_user_id": "anon_7f3"},
    ]  # fmt: skip
    assert b"null" not in server.requests[0].body


async def test_request_headers(server: ReferenceServer, make_tracker: MakeTracker) -> None:
    async with make_tracker() as tracker:
        track_many(tracker, 2)
    headers = server.requests[0].headers
    assert headers["X-API-KEY"] == server.api_key
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith(f"lehnz-async/{__version__} ")
    assert len(headers["Idempotency-Key"]) == 32


# -- lifecycle --------------------------------------------------------------------------


async def test_lazy_start_on_first_track_in_a_running_loop(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    tracker = make_tracker(flush_interval=0.05)
    tracker.track("usr_1", "view")  # no start(), no async with, no flush()
    await server.wait_for_events(1, timeout=5)
    await tracker.aclose()
    assert tracker.stats.delivered == 1


def test_events_tracked_before_any_loop_runs_are_sent(threaded_server: ReferenceServer) -> None:
    tracker = Tracker(threaded_server.api_key, endpoint=threaded_server.url)
    track_many(tracker, 7)  # no loop in this thread
    assert tracker.stats.queued == 7
    asyncio.run(tracker.aclose())
    assert len(threaded_server.events) == 7
    assert tracker.stats.delivered == 7


async def test_flush_settles_everything_tracked_before_it(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    server.faults.latency = 0.05
    tracker = make_tracker(max_batch_size=7, flush_interval=3600)
    async with tracker:
        track_many(tracker, 30)
        await tracker.flush()
        stats = tracker.stats
        assert (stats.delivered, stats.queued, stats.in_flight) == (30, 0, 0)
        assert len(server.events) == 30
        await tracker.flush()  # nothing pending: returns at once
        track_many(tracker, 5, start=30)
        await tracker.flush()
        assert len(server.events) == 35


async def test_aclose_is_idempotent_and_later_events_are_reported(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    tracker = make_tracker()
    async with tracker:
        track_many(tracker, 3)
    await tracker.aclose()
    assert tracker.closed and len(server.events) == 3
    tracker.track("usr_late", "view")  # never raises into the caller
    assert [type(e) for e in errors] == [ShutdownError]
    assert errors.events[0].user_id == "usr_late"
    assert tracker.stats.failed == 1
    assert_ledger(tracker.stats)
    with pytest.raises(TrackerClosedError, match="create a new Tracker"):
        await tracker.start()


async def test_close_deadline_reports_what_is_unsettled(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    server.faults.latency = 30
    tracker = make_tracker(max_batch_size=10)
    tracker.track("usr_0", "view")
    track_many(tracker, 25, start=1)
    started = time.monotonic()
    await tracker.aclose(timeout=0.3)
    assert time.monotonic() - started < 5
    assert tracker.stats.failed == 26 and tracker.stats.delivered == 0
    assert all(isinstance(e, ShutdownError) for e in errors)
    assert sorted(e.user_id for e in errors.events) == sorted(f"usr_{i}" for i in range(26))
    assert_ledger(tracker.stats)


async def test_aclose_finishes_even_when_the_caller_is_cancelled(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    server.faults.latency = 0.3
    tracker = make_tracker()
    track_many(tracker, 10)
    with anyio.move_on_after(0.01) as scope:
        await tracker.aclose()
    assert scope.cancelled_caught
    assert tracker.closed and len(server.events) == 10


async def test_a_session_passed_in_is_used_and_left_open(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    async with aiohttp.ClientSession() as session:
        async with make_tracker(session=session) as tracker:
            track_many(tracker, 4)
        assert not session.closed
    assert len(server.events) == 4


# -- failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "error_type"),
    [
        (400, "Missing mandatory fields", RejectedError),
        (400, "Invalid event_family", RejectedError),
        (401, "Missing or invalid X-API-KEY", AuthenticationError),
        (403, "Secret keys prohibited on public endpoints", AuthenticationError),
    ],
)
async def test_client_errors_go_to_on_error_without_retry(
    server: ReferenceServer,
    make_tracker: MakeTracker,
    errors: Errors,
    status: int,
    message: str,
    error_type: type,
) -> None:
    server.faults.fail_next(1, status, message=message)
    async with make_tracker() as tracker:
        tracker.track("usr_1", "view")
    (error,) = errors
    assert type(error) is error_type
    assert (error.status, error.server_message) == (status, message)
    assert [e.user_id for e in error.events] == ["usr_1"]
    assert len(server.requests) == 1 and tracker.stats.retries == 0
    assert tracker.stats.failed == 1
    assert_ledger(tracker.stats)


async def test_an_unknown_key_is_refused_by_the_server_once_per_batch(
    errors: Errors,
) -> None:
    async with ReferenceServer(api_keys={"lehnz_pk_good"}) as server:
        tracker = Tracker("lehnz_pk_revoked", endpoint=server.url, on_error=errors)
        async with tracker:
            track_many(tracker, 3)
        assert len(server.requests) == 1 and server.events == []
    (error,) = errors
    assert isinstance(error, AuthenticationError) and error.status == 401
    assert len(error.events) == 3


async def test_a_plain_text_error_body_is_reported(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    server.faults.fail_next(1, 422, message="unprocessable, says the proxy", plain_text=True)
    async with make_tracker() as tracker:
        tracker.track("usr_1", "view")
    (error,) = errors
    assert isinstance(error, RejectedError)
    assert (error.status, error.server_message) == (422, "unprocessable, says the proxy")


async def test_one_poison_event_does_not_take_its_batch_down(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    server.faults.reject_event = lambda e: "no bots" if e["user_id"] == "usr_37" else None
    async with make_tracker() as tracker:
        track_many(tracker, 100)
    assert len(server.events) == 99
    (error,) = errors
    assert isinstance(error, RejectedError) and error.server_message == "no bots"
    assert [e.user_id for e in error.events] == ["usr_37"]
    assert_ledger(tracker.stats)


async def test_retryable_failures_are_retried_with_the_same_idempotency_key(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    server.faults.fail_next(1, 503)
    server.faults.fail_next(1, 500)
    server.faults.fail_next(1, drop_connection=True)
    async with make_tracker() as tracker:
        track_many(tracker, 5)
    assert errors == [] and len(server.events) == 5
    assert [r.status for r in server.requests] == [503, 500, 0, 202]
    assert len({r.idempotency_key for r in server.requests}) == 1
    assert tracker.stats.retries == 3 and tracker.stats.requests == 4


async def test_a_slow_answer_times_out_and_is_retried(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    server.faults.fail_next(1, 202, delay=2.0)
    async with make_tracker(request_timeout=0.2) as tracker:
        tracker.track("usr_1", "view")
        await tracker.flush()
        assert tracker.stats.retries == 1
    assert errors == [] and len(server.events) == 1


async def test_retries_run_out_and_are_reported(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    server.faults.fail_next(10, 502)
    async with make_tracker(
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
        outage_grace=None,  # outage mode off: the retry policy alone decides
    ) as tracker:
        track_many(tracker, 2)
    (error,) = errors
    assert isinstance(error, RetriesExhaustedError) and error.status == 502
    assert len(server.requests) == 3 and tracker.stats.failed == 2
    assert_ledger(tracker.stats)


async def test_an_unencodable_context_fails_alone(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    async with make_tracker() as tracker:
        track_many(tracker, 5)
        tracker.track("usr_bad", "view", context={"when": object()})  # does not raise
        track_many(tracker, 5, start=5)
    assert len(server.events) == 10
    (error,) = errors
    assert isinstance(error, EncodeError) and error.events[0].user_id == "usr_bad"
    assert "context['when']: object values cannot be encoded as JSON" in str(error)
    assert_ledger(tracker.stats)


@dataclasses.dataclass
class _Price:
    amount: float


@pytest.mark.parametrize(
    ("context", "named"),
    [
        ({"n": {"deep": [1, object()]}}, "context['n']['deep'][1]: object values cannot"),
        ({1: "a", "1": "b"}, "context: the key 1 is not a str (int)"),
        ({"x": {2: "b"}}, "context['x']: the key 2 is not a str (int)"),
        ({"z": 1j, "ok": None}, "context['z']: complex values cannot be encoded"),
        ({"p": _Price(1j)}, "context['p']: _Price values cannot be encoded"),  # type: ignore[arg-type]
    ],
)
async def test_what_json_cannot_carry_is_refused_by_name_and_fails_alone(
    server: ReferenceServer,
    make_tracker: MakeTracker,
    errors: Errors,
    context: dict[Any, Any],
    named: str,
) -> None:
    """Never sent changed (an int key as a string, a duplicate key) or not at all: the
    event goes to on_error naming the part at fault, its batch goes on without it."""
    async with make_tracker() as tracker:
        tracker.track("usr_1", "view", item_id="p", context={"none": None, "price": 1.5})
        tracker.track("usr_bad", "view", context=context)
        tracker.track("usr_2", "view", item_id="p")
    assert [e["user_id"] for e in server.events] == ["usr_1", "usr_2"]
    assert server.events[0]["context"] == {"none": None, "price": 1.5}
    (error,) = errors
    assert isinstance(error, EncodeError) and error.events[0].user_id == "usr_bad"
    assert named in str(error) and str(error).startswith("the event cannot be sent as JSON")
    assert tracker.stats.failed == 1
    assert_ledger(tracker.stats)


async def test_context_values_reach_the_server_as_the_readme_table_says(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    import datetime
    import decimal
    import enum
    import uuid

    class Color(enum.Enum):
        RED = "red"

    when = datetime.datetime(2026, 12, 4, 11, 30, tzinfo=datetime.timezone.utc)
    context = {
        "price": decimal.Decimal("9.99"),
        "when": when,
        "day": when.date(),
        "id": uuid.UUID(int=1),
        "color": Color.RED,
        "pair": (1, "a"),
        "tags": {"b", "a"},
        "raw": b"\x00\xff",
        "big": 2**70,
        "b": {"z": 1, "a": 2},
        "p": _Price(2.5),
        "nan": float("nan"),
        "inf": [float("inf"), float("-inf")],
    }
    async with make_tracker() as tracker:
        tracker.track("usr_1", "view", context=context)
    (sent,) = server.events
    assert sent["context"] == {
        "price": 9.99,
        "when": "2026-12-04T11:30:00Z",
        "day": "2026-12-04",
        "id": "00000000-0000-0000-0000-000000000001",
        "color": "red",
        "pair": [1, "a"],
        "tags": ["a", "b"],
        "raw": "AP8=",
        "big": 2**70,
        "b": {"a": 2, "z": 1},
        "p": {"amount": 2.5},
        "nan": None,  # JSON has no NaN or infinity: null, as JSON.stringify writes them
        "inf": [None, None],
    }
    assert b'"price":9.99' in server.requests[-1].body  # a number, with exactly its digits


async def test_a_full_queue_drops_and_counts(
    server: ReferenceServer, make_tracker: MakeTracker, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = make_tracker(max_queue_size=1_000)
    with caplog.at_level(logging.WARNING, "lehnz_async"):
        async with tracker:
            track_many(tracker, 1_500)  # the flusher cannot run in between
    stats = tracker.stats
    assert (stats.tracked, stats.delivered, stats.dropped) == (1_500, 1_000, 500)
    assert len(server.events) == 1_000
    assert stats.drops == {"max_queue_size": 500}
    assert "buffer full" in caplog.text and caplog.text.count("buffer full") == 1
    assert_ledger(stats)


async def test_an_on_error_that_raises_is_logged_and_ignored(
    server: ReferenceServer, make_tracker: MakeTracker, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(error: Any) -> None:
        raise RuntimeError("boom")

    server.faults.fail_next(1, 400)
    async with make_tracker(on_error=explode, max_batch_size=1) as tracker:
        tracker.track("usr_1", "view")
        tracker.track("usr_2", "view")
    assert "on_error raised" in caplog.text
    assert [e["user_id"] for e in server.events] == ["usr_2"]


async def test_the_ledger_balances_while_events_are_in_flight(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    server.faults = FaultPlan(latency=0.1)
    tracker = make_tracker(max_batch_size=10)
    async with tracker:
        track_many(tracker, 100)
        await server.wait_for(lambda: server.in_flight > 0)
        assert tracker.stats.in_flight > 0
        assert_ledger(tracker.stats)
    assert_ledger(tracker.stats)
    assert tracker.stats.delivered == 100


async def test_server_body_is_exactly_the_encoded_events(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    async with make_tracker() as tracker:
        tracker.track("usr_é", "search", context={"query": "vélo ☃", "n": 3})
    body = msgspec.json.decode(server.requests[0].body)
    assert body == [
        {"user_id": "usr_é", "event_family": "engagement", "event_name": "search",
         "context": {"query": "vélo ☃", "n": 3}}
    ]  # fmt: skip
