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
``lehnz.sdk.exporter.stalled``              gauge, s            seconds the tracker has been
                                                                stalled (``stall_timeout``),
                                                                0 when it is not
``lehnz.sdk.exporter.operation.duration``   histogram, s        ``http.response.status_code``
                                                                or ``error.type``
==========================================  ==================  =========================

Every instrument also carries ``lehnz.tracker.name`` (``name=`` below) so that two
trackers in one process can be told apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
        config = tracker._config
        gauges: list[tuple[str, str, str, Callable[[], int]]] = [
            (
                "lehnz.sdk.queue.size",
                "{event}",
                "Events waiting to be cut into batches",
                lambda: tracker.stats.queued,
            ),
            (
                "lehnz.sdk.queue.capacity",
                "{event}",
                "The most events that may wait (max_queue_size)",
                lambda: config.max_queue_size,
            ),
            (
                "lehnz.sdk.buffer.size",
                "By",
                "Bytes the queued and in-flight events are reckoned to hold",
                lambda: tracker.stats.backlog_bytes,
            ),
            (
                "lehnz.sdk.buffer.capacity",
                "By",
                "The memory budget (max_buffer_bytes)",
                lambda: config.max_buffer_bytes,
            ),
            (
                "lehnz.sdk.exporter.event.inflight",
                "{event}",
                "Events cut into batches and not settled yet",
                lambda: tracker.stats.in_flight,
            ),
            (
                "lehnz.sdk.exporter.request.inflight",
                "{request}",
                "Requests to the ingestion endpoint under way",
                lambda: tracker._ledger.requests_in_flight,
            ),
            (
                "lehnz.sdk.exporter.outage",
                "1",
                "1 while the ingestion endpoint is treated as down",
                lambda: int(tracker.stats.state == "outage"),
            ),
        ]
        self._instruments: list[object] = [
            meter.create_observable_counter(
                "lehnz.sdk.event.processed",
                [self._processed],
                unit="{event}",
                description="Events settled by the tracker, by outcome",
            ),
            meter.create_observable_counter(
                "lehnz.sdk.exporter.outages",
                [self._observe(lambda: tracker.stats.outages)],
                unit="{outage}",
                description="Outages of the ingestion endpoint so far",
            ),
        ]
        self._instruments.append(
            meter.create_observable_gauge(
                "lehnz.sdk.exporter.stalled",
                [lambda _: [Observation(tracker.health().stalled_for, self._attrs)]],
                unit="s",
                description="Seconds nothing was delivered while events waited (0: not stalled)",
            )
        )
        for name, unit, description, read in gauges:
            self._instruments.append(
                meter.create_observable_up_down_counter(
                    name, [self._observe(read)], unit=unit, description=description
                )
            )
        self._duration = meter.create_histogram(
            "lehnz.sdk.exporter.operation.duration",
            unit="s",
            description="Duration of each request to the ingestion endpoint",
        )
        tracker._ledger.request_observers.append(self._record)

    def _observe(
        self, read: Callable[[], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """An observable's callback: one observation of ``read()``."""
        return lambda _: [Observation(read(), self._attrs)]

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
