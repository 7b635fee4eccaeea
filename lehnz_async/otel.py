"""OpenTelemetry metrics for a tracker: what it delivered, dropped and holds, whether the
service is reachable, and how long requests take. Install with the ``otel`` extra.

Usage::

    from lehnz_async import Tracker
    from lehnz_async.otel import instrument

    tracker = Tracker()
    instrument(tracker)  # the global MeterProvider; or instrument(tracker, meter_provider=...)

The names follow OpenTelemetry's conventions for an SDK's own metrics
(``otel.sdk.processor.*``, ``otel.sdk.exporter.*``), under ``lehnz.sdk.``:

==========================================  ==================  =========================
instrument                                  kind, unit          attributes
==========================================  ==================  =========================
``lehnz.sdk.event.processed``               counter, {event}    ``lehnz.outcome``:
                                                                delivered, failed, dropped,
                                                                spooled; ``error.type``:
                                                                the drop's reason
``lehnz.sdk.queue.size``                    up-down, {event}    events waiting to be sent
``lehnz.sdk.queue.capacity``                up-down, {event}    ``max_queue_size``
``lehnz.sdk.buffer.size``                   up-down, By         bytes queued and in flight
``lehnz.sdk.buffer.capacity``               up-down, By         ``max_buffer_bytes``
``lehnz.sdk.exporter.event.inflight``       up-down, {event}    events sent, not settled
``lehnz.sdk.exporter.request.inflight``     up-down, {request}  requests under way
``lehnz.sdk.exporter.outage``               up-down, 1          1 during an outage
``lehnz.sdk.exporter.outages``              counter, {outage}   outages so far
``lehnz.sdk.exporter.operation.duration``   histogram, s        ``http.response.status_code``
                                                                or ``error.type``
==========================================  ==================  =========================

Every instrument also carries ``lehnz.tracker.name`` (``name=`` below) so that two
trackers in one process can be told apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from .__about__ import __version__

if TYPE_CHECKING:
    from ._tracker import Tracker

__all__ = ["Instrumentation", "instrument"]


class Instrumentation:
    """The instruments registered for one tracker; `uninstrument` stops them."""

    def __init__(self, tracker: Tracker, meter: metrics.Meter, name: str) -> None:
        self._tracker = tracker
        self._attrs = {"lehnz.tracker.name": name}
        attrs = self._attrs
        config = tracker._config
        self._instruments = [
            meter.create_observable_counter(
                "lehnz.sdk.event.processed",
                [self._processed],
                unit="{event}",
                description="Events settled by the tracker, by outcome",
            ),
            meter.create_observable_up_down_counter(
                "lehnz.sdk.queue.size",
                [lambda _: [Observation(tracker.stats.queued, attrs)]],
                unit="{event}",
                description="Events waiting to be cut into batches",
            ),
            meter.create_observable_up_down_counter(
                "lehnz.sdk.queue.capacity",
                [lambda _: [Observation(config.max_queue_size, attrs)]],
                unit="{event}",
                description="The most events that may wait (max_queue_size)",
            ),
            meter.create_observable_up_down_counter(
                "lehnz.sdk.buffer.size",
                [lambda _: [Observation(tracker.stats.backlog_bytes, attrs)]],
                unit="By",
                description="Bytes the queued and in-flight events are reckoned to hold",
            ),
            meter.create_observable_up_down_counter(
                "lehnz.sdk.buffer.capacity",
                [lambda _: [Observation(config.max_buffer_bytes, attrs)]],
                unit="By",
                description="The memory budget (max_buffer_bytes)",
            ),
            meter.create_observable_up_down_counter(
                "lehnz.sdk.exporter.event.inflight",
                [lambda _: [Observation(tracker.stats.in_flight, attrs)]],
                unit="{event}",
                description="Events cut into batches and not settled yet",
            ),
            meter.create_observable_up_down_counter(
                "lehnz.sdk.exporter.request.inflight",
                [lambda _: [Observation(tracker._ledger.requests_in_flight, attrs)]],
                unit="{request}",
                description="Requests to the ingestion endpoint under way",
            ),
            meter.create_observable_up_down_counter(
                "lehnz.sdk.exporter.outage",
                [lambda _: [Observation(int(tracker.stats.state == "outage"), attrs)]],
                unit="1",
                description="1 while the ingestion endpoint is treated as down",
            ),
            meter.create_observable_counter(
                "lehnz.sdk.exporter.outages",
                [lambda _: [Observation(tracker.stats.outages, attrs)]],
                unit="{outage}",
                description="Outages of the ingestion endpoint so far",
            ),
        ]
        self._duration = meter.create_histogram(
            "lehnz.sdk.exporter.operation.duration",
            unit="s",
            description="Duration of each request to the ingestion endpoint",
        )
        tracker._ledger.request_observers.append(self._record)

    def _processed(self, options: CallbackOptions) -> Iterable[Observation]:
        stats = self._tracker.stats
        attrs = self._attrs
        yield Observation(stats.delivered, {**attrs, "lehnz.outcome": "delivered"})
        yield Observation(stats.failed, {**attrs, "lehnz.outcome": "failed"})
        yield Observation(stats.spooled, {**attrs, "lehnz.outcome": "spooled"})
        for reason, n in stats.drops.items():
            yield Observation(n, {**attrs, "lehnz.outcome": "dropped", "error.type": reason})

    def _record(self, seconds: float, status: int | None, failure: str | None) -> None:
        attrs: dict[str, str | int] = dict(self._attrs)
        if status is not None:
            attrs["http.response.status_code"] = status
            if not 200 <= status < 300:
                attrs["error.type"] = str(status)
        else:
            attrs["error.type"] = failure or "unknown"
        self._duration.record(seconds, attrs)

    def uninstrument(self) -> None:
        """Stop recording request durations (observable instruments stay registered with
        the meter, as OpenTelemetry offers no way to remove them, but read nothing new)."""
        observers = self._tracker._ledger.request_observers
        if self._record in observers:
            observers.remove(self._record)


def instrument(
    tracker: Tracker,
    *,
    meter_provider: metrics.MeterProvider | None = None,
    name: str = "default",
) -> Instrumentation:
    """Register OpenTelemetry instruments over ``tracker``'s stats (see the module's table).

    Args:
        tracker: The tracker to observe.
        meter_provider: Where to register; None uses the global one.
        name: The ``lehnz.tracker.name`` attribute of every measurement.
    """
    provider = meter_provider or metrics.get_meter_provider()
    meter = provider.get_meter("lehnz_async", __version__)
    return Instrumentation(tracker, meter, name)
