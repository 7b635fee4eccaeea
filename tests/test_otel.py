"""lehnz_async.otel: the tracker's own metrics, read with the OpenTelemetry SDK's
in-memory reader, after real deliveries to the reference server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from lehnz_async import Tracker
from lehnz_async.otel import instrument
from lehnz_async.testing import ReferenceServer

from .conftest import track_many

pytestmark = pytest.mark.anyio


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "lehnz_async"
            for metric in scope.metrics:
                found[metric.name] = list(metric.data.data_points)
    return found


def value(found: dict[str, list[Any]], name: str, **attrs: Any) -> Any:
    for point in found[name]:
        if all(point.attributes.get(k) == v for k, v in attrs.items()):
            return point.value if hasattr(point, "value") else point
    raise AssertionError(f"no {name} point with {attrs}: {found[name]}")


async def test_the_tracker_reports_its_own_metrics(
    server: ReferenceServer, make_tracker: Callable[..., Tracker]
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    server.faults.fail_next(1, 503)
    server.faults.reject_event = lambda e: "bad" if e["user_id"] == "usr_7" else None
    tracker = make_tracker(max_batch_size=10, max_queue_size=30)
    instrument(tracker, meter_provider=provider, name="shop")
    async with tracker:
        track_many(tracker, 40)  # 10 over the queue bound: dropped
        await tracker.flush()
        found = points(reader)
    assert value(found, "lehnz.sdk.event.processed", **{"lehnz.outcome": "delivered"}) == 29
    assert value(found, "lehnz.sdk.event.processed", **{"lehnz.outcome": "failed"}) == 1
    dropped = {"lehnz.outcome": "dropped", "error.type": "max_queue_size"}
    assert value(found, "lehnz.sdk.event.processed", **dropped) == 10
    assert value(found, "lehnz.sdk.queue.size") == 0
    assert value(found, "lehnz.sdk.queue.capacity") == 30
    assert value(found, "lehnz.sdk.exporter.event.inflight") == 0
    assert value(found, "lehnz.sdk.exporter.request.inflight") == 0
    assert value(found, "lehnz.sdk.exporter.outage") == 0
    assert value(found, "lehnz.sdk.buffer.capacity") == tracker._config.max_buffer_bytes
    ok = value(found, "lehnz.sdk.exporter.operation.duration", **{"http.response.status_code": 202})
    failed = value(found, "lehnz.sdk.exporter.operation.duration", **{"error.type": "503"})
    assert failed.count == 1 and ok.count >= 3
    assert ok.count + failed.count + 5 >= tracker.stats.requests  # and the 400s of bisection
    assert all(p.attributes["lehnz.tracker.name"] == "shop" for ps in found.values() for p in ps)


async def test_an_outage_shows_in_the_metrics(server: ReferenceServer) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    tracker = Tracker(
        server.api_key, endpoint=server.url, outage_grace=0.1, probe_max_delay=0.2,
        flush_interval=0.05,
    )  # fmt: skip
    instrument(tracker, meter_provider=provider)
    async with tracker:
        await server.outage("refuse", None)
        track_many(tracker, 5)
        for _ in range(500):  # the tracker's state is not the server's: poll it, bounded
            if tracker.stats.state == "outage":
                break
            await asyncio.sleep(0.01)
        found = points(reader)
        assert value(found, "lehnz.sdk.exporter.outage") == 1
        assert value(found, "lehnz.sdk.exporter.outages") == 1
        assert (
            value(found, "lehnz.sdk.queue.size") + value(found, "lehnz.sdk.exporter.event.inflight")
            == 5
        )
        refused = value(found, "lehnz.sdk.exporter.operation.duration")
        assert "error.type" in refused.attributes  # no HTTP answer: the error's type
        await server.restore()
        await tracker.flush()
    assert value(points(reader), "lehnz.sdk.exporter.outage") == 0
