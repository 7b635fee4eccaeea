"""The delivery engine's guarantees over real loopback HTTP: every failure settled, a close
that cancellation cannot cut short, a batch that keeps its key, one closed-state rule,
one validation verdict, and recommend() on its own connections."""

from __future__ import annotations

import asyncio
import builtins
import gc
import logging
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from lehnz_async import (
    DeliveryError,
    Event,
    InvalidEventError,
    RetriesExhaustedError,
    RetryPolicy,
    ShutdownError,
    Tracker,
    TrackerClosedError,
    _transport,
)
from lehnz_async._event import build_event
from lehnz_async._transport import MAX_MESSAGE
from lehnz_async.testing import ReferenceServer

from .conftest import FAST_RETRY, Errors, track_many, user_ids

pytestmark = pytest.mark.anyio

MakeTracker = Callable[..., Tracker]

BAD_BODIES = {
    "latin-1": b"service indisponible, r\xe9essayez",
    "html": b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n",
    "deep-json": b'{"error": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "unclosed-json": b"{" * 100_000,
    "10-MB": b"<p>" + b"x" * (10 * 1024 * 1024) + b"</p>",
    "binary": bytes(range(256)) * 64,
}


# -- every failure is settled -----------------------------------------------------------


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_an_undecodable_error_body_is_retried_then_delivered(
    server: ReferenceServer, make_tracker: MakeTracker, body: bytes
) -> None:
    server.faults.fail_next(2, 502, body=body)
    async with make_tracker(max_batch_size=20) as tracker:
        track_many(tracker, 20)
    assert tracker.stats.delivered == 20 and tracker.stats.retries == 2


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_an_undecodable_error_body_is_reported_in_one_short_line(
    server: ReferenceServer,
    make_tracker: MakeTracker,
    errors: Errors,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
) -> None:
    server.faults.fail_next(1, 503, body=body)
    caplog.set_level(logging.DEBUG, logger="lehnz_async")
    async with make_tracker(retry=RetryPolicy(max_attempts=1), outage_grace=None) as tracker:
        track_many(tracker, 20)
        await tracker.flush()  # returns: the batch is settled, not stranded
    (error,) = errors
    assert isinstance(error, RetriesExhaustedError) and len(error.events) == 20
    message = error.server_message or ""
    assert len(message) <= MAX_MESSAGE and message.isprintable(), message
    assert "<" not in message
    for record in caplog.records:
        assert "\n" not in record.getMessage(), record.getMessage()[:200]


async def test_an_unexpected_exception_settles_its_batch_and_the_workers_go_on(
    server: ReferenceServer,
    make_tracker: MakeTracker,
    errors: Errors,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_answer = _transport.read_answer

    def buggy(status: int, payload: bytes, retry_after: str | None) -> _transport.Response:
        if status == 418:
            raise RuntimeError("a bug in reading answers")
        return read_answer(status, payload, retry_after)

    monkeypatch.setattr(_transport, "read_answer", buggy)
    server.faults.fail_next(1, 418)
    async with make_tracker(max_batch_size=10, max_concurrent_requests=1) as tracker:
        track_many(tracker, 30)
        await tracker.flush()
        track_many(tracker, 10, start=30)
    (error,) = errors
    assert isinstance(error.__cause__, RuntimeError) and len(error.events) == 10
    assert tracker.stats.delivered == 30 and tracker.stats.failed == 10


async def test_halves_of_a_refused_batch_carry_keys_derived_from_it(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    server.faults.reject_event = lambda e: "bad" if e["user_id"] == "usr_5" else None
    async with make_tracker(max_batch_size=8) as tracker:
        track_many(tracker, 8)
    keys = [r.idempotency_key or "" for r in server.requests]
    assert all(key.startswith(keys[0] + ".") for key in keys[1:]), keys
    assert len(set(keys)) == len(keys)
    assert [e.user_id for e in errors.events] == ["usr_5"]


# -- a batch keeps its key -------------------------------------------------------------


def test_a_batch_caught_by_a_torn_down_loop_goes_out_again_under_its_key(
    threaded_server: ReferenceServer,
) -> None:
    server = threaded_server
    server.faults.fail_next(1, drop_connection=True, process=True)  # stored, answer lost
    server.faults.fail_next(1, 503, retry_after="3")  # the retry waits 3 s: tear down then
    tracker = Tracker(server.api_key, endpoint=server.url, retry=FAST_RETRY)

    async def main() -> None:
        track_many(tracker, 10)
        # the server runs on another loop, in another thread: poll it
        while len(server.requests) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    asyncio.run(main())  # returns with the batch waiting to retry: its loop is torn down
    tracker.close()  # it resumed in a thread of its own; this waits for it
    assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(10))  # once each
    assert server.duplicates == 1
    assert len({r.idempotency_key for r in server.requests}) == 1
    assert tracker.stats.delivered == 10


# -- aclose() under cancellation --------------------------------------------------------


async def _cancel_by(how: str, close: Callable[[], Any]) -> type[BaseException] | None:
    """Run ``close()`` under the given kind of cancellation after 50 ms; what it raised."""
    try:
        if how == "wait_for":
            await asyncio.wait_for(close(), 0.05)
        elif how == "asyncio.timeout":
            async with asyncio.timeout(0.05):  # type: ignore[attr-defined]
                await close()
        elif how == "TaskGroup":

            async def fail_soon() -> None:
                await asyncio.sleep(0.05)
                raise LookupError("a sibling failed")

            async with asyncio.TaskGroup() as tg:  # type: ignore[attr-defined]
                tg.create_task(close())
                tg.create_task(fail_soon())
        elif how == "Task.cancel":
            task = asyncio.get_running_loop().create_task(close())
            await asyncio.sleep(0.05)
            task.cancel()
            await task
        else:
            with anyio.move_on_after(0.05):
                await close()
    except BaseException as exc:
        return type(exc)
    return None


HOW = ["wait_for", "asyncio.timeout", "TaskGroup", "Task.cancel", "anyio"]


@pytest.mark.parametrize("how", HOW)
async def test_aclose_runs_to_the_end_whatever_cancels_the_caller(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors, how: str
) -> None:
    if how in ("asyncio.timeout", "TaskGroup") and sys.version_info < (3, 11):
        pytest.skip("asyncio.timeout and TaskGroup are Python 3.11+")
    server.faults.latency = 0.1
    tracker = make_tracker(max_batch_size=20, max_concurrent_requests=2)
    track_many(tracker, 100)  # five rounds of two requests of 0.1 s: about 0.5 s
    raised = await _cancel_by(how, tracker.aclose)
    assert tracker.closed
    assert len(server.events) == 100 and errors == []
    expected: dict[str, type[BaseException] | None] = {
        "wait_for": TimeoutError if sys.version_info >= (3, 11) else asyncio.TimeoutError,
        "asyncio.timeout": TimeoutError,
        "TaskGroup": getattr(builtins, "ExceptionGroup", None),  # the sibling's LookupError
        "Task.cancel": asyncio.CancelledError,
        "anyio": None,  # the scope catches its own cancellation
    }
    assert raised is expected[how]


async def test_a_second_cancellation_gives_up_what_is_unsettled_at_once(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    server.faults.latency = 5.0
    tracker = make_tracker(max_batch_size=10, close_timeout=30)
    track_many(tracker, 50)
    task = asyncio.get_running_loop().create_task(tracker.aclose())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # the first cancellation waits for the close
    task.cancel()
    with anyio.fail_after(2), pytest.raises(asyncio.CancelledError):
        await task
    assert tracker.closed
    assert tracker.stats.failed == 50 and all(isinstance(e, ShutdownError) for e in errors)


# -- one closed-state rule --------------------------------------------------------------


async def test_a_closed_tracker_follows_one_rule(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    tracker = make_tracker()
    server.faults.latency = 0.0
    track_many(tracker, 5)
    assert (await tracker.recommend("usr_1")).recommendation_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await tracker.aclose()
        with pytest.raises(TrackerClosedError):
            await tracker.start()
        with pytest.raises(TrackerClosedError):
            await tracker.recommend("usr_1")
        await tracker.flush()  # returns at once
        tracker.track("usr_late", "view")  # reported, never raised into a request path
        await tracker.atrack("usr_later", "view")
        await tracker.aclose()  # idempotent
        del tracker
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert [e.user_id for e in errors.events] == ["usr_late", "usr_later"]
    assert all(isinstance(e, ShutdownError) for e in errors)
    assert len(server.events) == 5


async def test_recommend_does_not_queue_behind_the_uploads(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    server.faults.latency = 0.5  # ingest answers take half a second; /recommend does not
    async with make_tracker(max_batch_size=5, max_concurrent_requests=2) as tracker:
        track_many(tracker, 20)
        await server.wait_for(lambda: server.in_flight == 2)
        await tracker.recommend("usr_1")
        assert server.in_flight == 2  # both uploads still hold their connections
        assert server.requests == []


# -- one validation verdict -------------------------------------------------------------


class _Str(str):
    pass


ODD_INPUTS: list[tuple[Any, Any, dict[str, Any]]] = [
    ("u", "view", {}),
    ("u", "identify", {}),
    ("u", "identify", {"event_family": "engagement"}),
    ("u", "identify", {"event_family": "system"}),
    ("u", "wishlist", {}),
    ("u", "wishlist", {"event_family": "engagement"}),
    ("u", "ping", {"event_family": "system"}),
    ("u", "view", {"event_family": "bogus"}),
    ("u", "view", {"event_family": ["engagement"]}),
    ("", "view", {}),
    ("u", "", {}),
    (None, "view", {}),
    (1, "view", {}),
    (_Str("u"), "view", {}),
    ("u", _Str("view"), {}),
    ("u", ["view"], {}),
    ("u", "view", {"item_id": 5}),
    ("u", "view", {"item_id": ["p"]}),
    ("u", "view", {"item_id": _Str("p")}),
    ("u", "view", {"session_id": b"s"}),
    ("u", "view", {"recommendation_id": 1.0}),
    ("u", "view", {"context": {"a": 1}}),
    ("u", "view", {"context": [("a", 1)]}),
    ("u", "view", {"context": "a=1"}),
    ("u", "purchase", {"context": {"price": 9.5}, "item_id": "p", "session_id": "s"}),
]


def _verdict(call: Callable[[], Event | None]) -> tuple[str, Any]:
    try:
        return "ok", call()
    except InvalidEventError as exc:
        return "refused", exc.field


async def test_the_fast_and_checked_paths_give_the_same_verdict() -> None:
    import collections

    async with Tracker(capture=True, flush_interval=3600, max_batch_size=10_000) as tracker:
        buffer = tracker._buffer.events
        # each input again with an OrderedDict context: the checked path's trigger
        ordered = [
            (u, n, {**f, "context": collections.OrderedDict(f.get("context") or {"k": 1})})
            for u, n, f in ODD_INPUTS
            if isinstance(f.get("context"), (dict, type(None)))
        ]
        for user_id, name, fields in ODD_INPUTS + ordered:

            def fast(fields: dict[str, Any] = fields, user_id: Any = user_id, name: Any = name):
                tracker.track(user_id, name, **fields)
                return buffer.pop()

            def checked(fields: dict[str, Any] = fields, user_id: Any = user_id, name: Any = name):
                return build_event(
                    user_id,
                    name,
                    fields.get("item_id"),
                    fields.get("event_family"),
                    fields.get("session_id"),
                    fields.get("recommendation_id"),
                    fields.get("context"),
                )

            assert _verdict(fast) == _verdict(checked), (user_id, name, fields)


async def test_attribution_refuses_an_unhashable_item_id_by_name(server: ReferenceServer) -> None:
    async with Tracker(
        server.api_key, endpoint=server.url, attribution_ttl=60.0, flush_interval=3600
    ) as tracker:
        with pytest.raises(InvalidEventError) as caught:
            tracker.track("usr_1", "view", item_id=["p"])  # type: ignore[arg-type]
        assert caught.value.field == "item_id"


async def test_stats_add_up_while_threads_track_and_batches_fly(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    tracker = make_tracker(max_batch_size=50)
    stop = threading.Event()
    snapshots = []

    def produce() -> None:
        i = 0
        while not stop.is_set():
            tracker.track(f"usr_{i}", "view")
            i += 1

    async with tracker:
        thread = threading.Thread(target=produce)
        thread.start()
        for _ in range(50):
            snapshots.append(tracker.stats)
            await asyncio.sleep(0.001)
        stop.set()
        thread.join()
    for s in snapshots:
        assert s.tracked == (
            s.delivered + s.failed + s.dropped + s.queued + s.in_flight + s.spooled
        ), s


def test_a_delivery_error_names_its_events() -> None:
    error = DeliveryError("x", [Event("u", "engagement", "view")])
    assert error.events[0].user_id == "u"
