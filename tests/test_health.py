"""`Tracker.health()` and the stall watchdog: each part stalled on purpose (a blocked
loop, a before_send that does not return, a server that accepts and never answers),
over real HTTP; the stall rule itself on a clock the test drives."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from lehnz_async import Event, Health, Tracker
from lehnz_async._watchdog import Probe, Watch
from lehnz_async.otel import instrument
from lehnz_async.testing import ReferenceServer

from .conftest import track_many
from .test_otel import points, value

MakeTracker = Callable[..., Tracker]

pytestmark = pytest.mark.anyio

STALL = 0.4  # seconds: the watchdog looks every 0.1 s


def stall_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "lehnz_async" and r.levelno == logging.ERROR and "stalled" in r.getMessage()
    ]


class FakeLedger:
    last_ok: float | None = None
    in_flight = 0


def test_the_stall_rule_on_a_driven_clock(caplog: pytest.LogCaptureFixture) -> None:
    """Stalled once the oldest unsettled event has waited ``timeout`` and nothing was
    delivered for as long; said once at ERROR, and once at WARNING when it ends."""
    ledger = FakeLedger()
    state = {"arrivals": 0, "queued": 0, "oldest": None}

    def progress() -> tuple[int, int, int | None]:
        return state["arrivals"], state["queued"], state["oldest"]  # type: ignore[return-value]

    watch = Watch(10.0, ledger, Probe(progress, lambda: None, lambda silent, t: "stuck"))  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, "lehnz_async")
    watch.check(0.0)  # nothing waits
    state.update(arrivals=5, queued=5, oldest=0)
    watch.check(1.0)  # five events tracked by now
    watch.check(10.9)  # waited 9.9 s: not yet
    assert watch.stalled_for(10.9) == 0.0
    watch.check(11.0)
    # stalled since the last sign of progress: the oldest event's arrival, at 1.0
    assert watch.stalled_for(12.0) == pytest.approx(11.0)
    assert "nothing delivered for 11.0 s while 5 event(s) wait, the oldest for 10.0 s: stuck" in (
        watch.reason
    )
    watch.check(12.0)
    watch.check(13.0)
    assert len(stall_records(caplog)) == 1  # said once
    ledger.last_ok = 13.5  # a delivery: the oldest now is a later one, tracked at 13.0
    state.update(arrivals=9, queued=4, oldest=5)
    watch.check(14.0)
    assert watch.stalled_for(14.0) == 0.0
    assert any("no longer stalled, after 13.0 s" in r.getMessage() for r in caplog.records)
    # a quiet tracker is never stalled, however long since the last delivery
    state.update(queued=0, oldest=None)
    watch.check(100.0)
    assert watch.stalled_for(100.0) == 0.0


async def test_health_says_ok_degraded_and_down(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    tracker = make_tracker()
    fresh = tracker.health()
    assert fresh.status == "ok" and fresh.last_delivery_age is None
    track_many(tracker, 5)
    await tracker.flush()
    ok = tracker.health()
    assert ok.status == "ok" and ok.reason == "" and ok.backlog_events == 0
    assert ok.last_delivery_age is not None and 0 <= ok.last_delivery_age < 5
    server.faults.reject_event = lambda e: "no" if e["user_id"] == "usr_bad" else None
    tracker.track("usr_bad", "view")
    await tracker.flush()
    degraded = tracker.health()
    assert degraded.status == "degraded" and "1 failed" in degraded.reason
    await tracker.aclose()
    closed = tracker.health()
    assert (closed.status, closed.reason, closed.state) == (
        "down",
        "the tracker is closed",
        "closed",
    )


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A server that accepts connections, reads, and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/api/v1/events/ingest"
    for writer in held:
        writer.close()
    srv.close()


async def test_a_server_that_never_answers_is_a_stall(
    silent_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "lehnz_async")
    tracker = Tracker(
        "lehnz_pk_test",
        endpoint=silent_server,
        request_timeout=60.0,
        stall_timeout=STALL,
        flush_interval=0.05,
    )
    track_many(tracker, 3)
    await tracker.start()
    deadline = time.monotonic() + 10
    while not stall_records(caplog) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # (the watchdog's thread logs: nothing to await)
    health = tracker.health()
    await tracker.aclose(timeout=0.2)
    [record] = stall_records(caplog)
    assert "while 3 event(s) wait" in record
    assert f"request(s) to {silent_server} sent and not answered yet" in record
    assert health.status == "down" and health.stalled_for > 0 and "stalled for" in health.reason


async def test_a_blocked_loop_is_a_stall(
    server: ReferenceServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop running the tracker is blocked by a synchronous call: the watchdog's
    thread sees it (health() read from another thread meanwhile says so), and the
    tracker recovers when the loop runs again."""
    caplog.set_level(logging.WARNING, "lehnz_async")
    tracker = Tracker(server.api_key, endpoint=server.url, stall_timeout=STALL, flush_interval=0.05)
    await tracker.start()
    seen: list[Health] = []
    track_many(tracker, 3)
    reader = threading.Timer(1.2, lambda: seen.append(tracker.health()))
    reader.start()
    time.sleep(1.5)  # noqa: ASYNC251 - the very fault under test: a blocked loop
    reader.join()
    await tracker.flush(timeout=10)
    deadline = time.monotonic() + 5
    while tracker.health().stalled_for and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    after = tracker.health()
    await tracker.aclose()
    [record] = stall_records(caplog)
    assert "the event loop running the tracker has not run for" in record
    assert seen[0].status == "down" and "event loop" in seen[0].reason
    assert after.status == "ok", after
    assert any("no longer stalled" in r.getMessage() for r in caplog.records)


async def test_a_before_send_that_does_not_return_is_a_stall(
    server: ReferenceServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "lehnz_async")

    def slow(event: Event) -> Event:
        time.sleep(1.2)  # a hook stuck on a lock, a network call...
        return event

    tracker = Tracker(
        server.api_key,
        endpoint=server.url,
        stall_timeout=STALL,
        flush_interval=0.05,
        before_send=slow,
    )
    reader = MeterProvider(metric_readers=[metrics := InMemoryMetricReader()])
    instrument(tracker, meter_provider=reader)
    await tracker.start()
    gauge: list[Any] = []
    tracker.track("usr_1", "view")
    probe = threading.Timer(
        1.0, lambda: gauge.append(value(points(metrics), "lehnz.sdk.exporter.stalled"))
    )
    probe.start()
    await tracker.flush(timeout=10)
    probe.join()
    await tracker.aclose()
    [record] = stall_records(caplog)
    assert "before_send has not returned" in record
    assert gauge[0] > 0  # the OTel gauge: seconds stalled, read while it was
    assert len(server.events) == 1
