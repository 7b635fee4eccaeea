"""One benchmark driver run in a process of its own; compare.py starts one per measurement.

    python benchmarks/drivers.py DRIVER --sink http://127.0.0.1:PORT --events N
        [--mode burst|paced|latency] [--queue-size Q] [--warmup W] [--probes P]

It prints one JSON object on stdout (see `run`) and nothing else there; what the libraries
log goes to stderr. A process per measurement means that its peak RSS belongs to one
driver and one run (see `rss_peak` for why it is read from /proc/self/status rather than
getrusage), that no driver inherits another's heap, threads or connections, and that each
imports only what it uses.

Drivers (every one sends the same event stream to the same sink, `benchmarks/sink.py`):

``lehnz_async``
    ``Tracker(api_key, endpoint=<sink>)`` with every option at its default, except
    ``max_queue_size`` when ``--queue-size`` is given.
``ceiling``
    What the tracker does with nothing else: a msgspec Struct built per event and
    appended to a list; then arrays of 500 encoded with one Encoder and POSTed 4 at a time
    on one aiohttp session.
``naive``
    A hand-written "one aiohttp POST per event": ``track()`` puts a dict on an unbounded
    ``asyncio.Queue``; 64 worker tasks each POST one event (``json=[event]``) on one
    aiohttp session limited to 64 connections.
``segment``
    ``segment.analytics.Client(write_key, host=<sink>)`` (segment-analytics-python),
    defaults except ``max_queue_size``; events go to ``/v1/batch``.
``posthog``
    ``posthog.Posthog(api_key, host=<sink>, capture_mode="v0")`` (posthog), defaults
    except ``max_queue_size``; events go to ``/batch/``.

Modes:

``burst``
    After a warm-up of ``--warmup`` events (sent and flushed, then the sink is reset),
    N calls in one tight loop, timed in 10 chunks; then the library's own flush, until it
    has returned and the sink's ``GET /count`` has been read: the end-to-end time.
``paced`` (lehnz_async only)
    N events generated 1,000 at a time (generation not timed), the producer yielding to
    the event loop after each chunk and waiting while the queue has no room for the next
    one: what a long-running app does; shows whether memory stays bounded by
    ``max_queue_size``.
``latency`` (lehnz_async, segment, posthog)
    Single calls timed one by one (``time.perf_counter_ns``), each after ~50 µs of busy
    work: first 1,000 with nothing to send (alternating with the same probe around a bare
    ``deque.append``: the floor), then, after a burst of N events, up to ``--probes``
    while the library delivers it. lehnz_async's probe is an asyncio task
    that yields to the loop after each call.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import gc
import http.client
import importlib
import inspect
import itertools
import json
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

DRIVERS = ("lehnz_async", "ceiling", "naive", "segment", "posthog")
PEERS = ("segment", "posthog")
MODES = ("burst", "paced", "latency")
#: Drivers that have a latency mode / a paced mode.
LATENCY_DRIVERS = ("lehnz_async", "segment", "posthog")
PACED_DRIVERS = ("lehnz_async",)

LEHNZ_PATH = "/api/v1/events/ingest"
LEHNZ_KEY = "lehnz_pk_bench"
SEGMENT_WRITE_KEY = "bench_write_key"
POSTHOG_API_KEY = "phc_bench"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

EVENT_NAMES = ("view", "click", "view", "add_to_cart", "view", "purchase")
#: The families lehnz_async fills in for those names (the ceiling and naive drivers
#: send them too, so that every driver of lehnz_async's format sends the same JSON).
FAMILIES = {
    "view": "engagement",
    "click": "engagement",
    "add_to_cart": "engagement",
    "purchase": "conversion",
}
#: Chunks the timed burst is cut into (their times show any slowdown with queue depth).
BURST_CHUNKS = 10
#: Events per chunk of the paced mode.
PACED_CHUNK = 1000
#: Ceiling driver: events per POST and POSTs in flight (lehnz_async's defaults).
CEILING_BATCH = 500
CEILING_CONCURRENCY = 4
#: Naive driver: POSTs in flight.
NAIVE_CONCURRENCY = 64
#: Latency mode: busy work before each timed call; calls timed with nothing to send.
PROBE_SPIN_NS = 50_000
IDLE_PROBES = 1000

#: One chunk of a driver's call arguments: one list per argument, built before timing.
Chunk = tuple[list[Any], ...]


# -- the event stream ---------------------------------------------------------------------


class Stream(NamedTuple):
    """Events ``start`` to ``stop`` of the benchmark's stream, one list per field."""

    user_ids: list[str]
    event_names: list[str]
    item_ids: list[str]
    #: A fresh dict per event.
    contexts: list[dict[str, Any]]


def make_stream(start: int, stop: int) -> Stream:
    """The deterministic event stream (the same as bench_tracker.py's)."""
    indices = range(start, stop)
    return Stream(
        user_ids=[f"usr_{i % 1000:05d}" for i in indices],
        event_names=[EVENT_NAMES[i % len(EVENT_NAMES)] for i in indices],
        item_ids=[f"prod_{i % 5000:05d}" for i in indices],
        contexts=[{"position": i % 20, "page": "home"} for i in indices],
    )


def peer_stream(start: int, stop: int) -> Chunk:
    """The same events for the peers' APIs: user ids, event names, and properties: the
    item id and the context's fields in one fresh dict per event."""
    indices = range(start, stop)
    return (
        [f"usr_{i % 1000:05d}" for i in indices],
        [EVENT_NAMES[i % len(EVENT_NAMES)] for i in indices],
        [{"item_id": f"prod_{i % 5000:05d}", "position": i % 20, "page": "home"} for i in indices],
    )


def chunk_bounds(events: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive (start, stop) ranges covering ``range(events)``."""
    bounds = [events * k // parts for k in range(parts + 1)]
    return [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def empty_loop_seconds(chunks: list[Chunk]) -> float:
    """Seconds of the drivers' loop over ``chunks`` with an empty body."""
    start = time.perf_counter()
    for chunk in chunks:
        if len(chunk) == 4:
            for _a, _b, _c, _d in zip(*chunk, strict=True):
                pass
        else:
            for _a, _b, _c in zip(*chunk, strict=True):
                pass
    return time.perf_counter() - start


# -- the sink, seen from a driver ----------------------------------------------------------


class SinkClient:
    """Blocking GET /count and POST /reset on the sink (one small request each)."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
            raise SystemExit(f"the sink must be http:// on a loopback address, not {base_url}")
        self.base_url = base_url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or 80

    def _request(self, method: str, path: str) -> dict[str, Any]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{method} {path}: the sink answered {resp.status}")
            result: dict[str, Any] = json.loads(body)
            return result
        finally:
            conn.close()

    def counts(self) -> dict[str, Any]:
        return self._request("GET", "/count")

    def reset(self) -> dict[str, Any]:
        return self._request("POST", "/reset")


def _proc_status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_now() -> int:
    """Resident set size of this process now, in bytes."""
    kb = _proc_status_kb("VmRSS")
    return rss_peak() if kb is None else kb * 1024


def rss_peak() -> int:
    """Peak resident set size of this process, in bytes.

    ``VmHWM`` (the high-water mark of this process's own memory map) where there is a
    /proc; ``getrusage(RUSAGE_SELF).ru_maxrss`` elsewhere. Not ru_maxrss on Linux: the
    kernel carries the maximum across fork and exec, so a child's ru_maxrss is at least
    the RSS of the process that spawned it (the orchestrator's, here), not its own.
    """
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def defaults_of(cls: Callable[..., Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The default values of some keyword parameters of ``cls``, read from its signature."""
    parameters = inspect.signature(cls).parameters
    return {name: parameters[name].default for name in names if name in parameters}


# -- the drivers ----------------------------------------------------------------------------


class Driver(abc.ABC):
    """One way of sending events; its methods run in this order."""

    #: Events reported as not delivered (on_error callbacks, non-2xx answers).
    errors = 0

    def counters(self) -> tuple[int | None, int | None]:
        """(dropped, failed) as the library counts them; None where it does not."""
        return None, self.errors

    @abc.abstractmethod
    async def start(self, sink: SinkClient, queue_size: int | None) -> dict[str, Any]:
        """Create the client; return its effective configuration (for the report)."""

    def prepare(self, start: int, stop: int) -> Chunk:
        """This driver's call arguments for events ``start`` to ``stop``, one list per
        argument (generated directly: no other copy of the events inflates the peak RSS)."""
        return tuple(make_stream(start, stop))

    @abc.abstractmethod
    def burst(self, chunks: list[Chunk]) -> list[float]:
        """Make one call per event of ``chunks`` without yielding; seconds per chunk."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Return once everything tracked so far was sent (the library's own way)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the client (not timed)."""

    def is_sending(self, since: int) -> bool:
        """Whether the burst is still being delivered (latency mode)."""
        raise NotImplementedError

    def single_call(self, args: tuple[Any, ...]) -> int:
        """Make one call; return its duration in nanoseconds (latency mode)."""
        raise NotImplementedError


class LehnzDriver(Driver):
    def __init__(self) -> None:
        self.tracker: Any = None

    async def start(self, sink: SinkClient, queue_size: int | None) -> dict[str, Any]:
        from lehnz_async import Tracker, __version__

        options: dict[str, Any] = {} if queue_size is None else {"max_queue_size": queue_size}
        self.tracker = Tracker(LEHNZ_KEY, endpoint=sink.base_url + LEHNZ_PATH, **options)
        await self.tracker.start()
        config = defaults_of(
            Tracker,
            (
                "max_batch_size",
                "max_concurrent_requests",
                "flush_interval",
                "max_queue_size",
                "overflow",
            ),
        )
        config.update(options)
        return {"version": __version__, **config}

    def burst(self, chunks: list[Chunk]) -> list[float]:
        track = self.tracker.track
        perf_counter = time.perf_counter
        seconds = []
        for chunk in chunks:
            start = perf_counter()
            for user_id, event_name, item_id, context in zip(*chunk, strict=True):
                track(user_id, event_name, item_id=item_id, context=context)
            seconds.append(perf_counter() - start)
        return seconds

    async def flush(self) -> None:
        await self.tracker.flush()

    async def close(self) -> None:
        await self.tracker.aclose()

    def counters(self) -> tuple[int | None, int | None]:
        stats = self.tracker.stats
        return stats.dropped, stats.failed

    def is_sending(self, since: int) -> bool:
        stats = self.tracker.stats
        return bool(stats.delivered + stats.failed < since)

    def single_call(self, args: tuple[Any, ...]) -> int:
        user_id, event_name, item_id, context = args
        track = self.tracker.track
        start = time.perf_counter_ns()
        track(user_id, event_name, item_id=item_id, context=context)
        return time.perf_counter_ns() - start

    async def paced(self, events: int, limit: int) -> tuple[float, float, list[float]]:
        """Track ``events`` in chunks generated on the fly, with backpressure.

        Returns (seconds in track() loops, seconds generating events, seconds per chunk).
        """
        track = self.tracker.track
        perf_counter = time.perf_counter
        track_seconds = generation_seconds = 0.0
        chunk_seconds = []
        for lo in range(0, events, PACED_CHUNK):
            hi = min(events, lo + PACED_CHUNK)
            started = perf_counter()
            chunk = make_stream(lo, hi)
            generation_seconds += perf_counter() - started
            # No room: let the flusher take batches (polling the public stats is the
            # only way an app can see the queue's depth).
            while self.tracker.stats.queued + (hi - lo) > limit:  # noqa: ASYNC110
                await asyncio.sleep(0)
            started = perf_counter()
            for user_id, event_name, item_id, context in zip(*chunk, strict=True):
                track(user_id, event_name, item_id=item_id, context=context)
            elapsed = perf_counter() - started
            track_seconds += elapsed
            chunk_seconds.append(elapsed)
            await asyncio.sleep(0)  # an app yields between requests
        return track_seconds, generation_seconds, chunk_seconds


def _ceiling_event_type() -> type[Any]:
    import msgspec

    class CeilingEvent(msgspec.Struct, omit_defaults=True, gc=False):
        """lehnz_async's wire event, less the fields the benchmark never sets."""

        user_id: str
        event_family: str
        event_name: str
        item_id: str | None = None
        context: dict[str, Any] | None = None

    return CeilingEvent


class CeilingDriver(Driver):
    def __init__(self) -> None:
        self.events: list[Any] = []

    async def start(self, sink: SinkClient, queue_size: int | None) -> dict[str, Any]:
        import aiohttp
        import msgspec

        self._event = _ceiling_event_type()
        self._encode = msgspec.json.Encoder().encode
        self._url = sink.base_url + LEHNZ_PATH
        self._headers = {"X-API-KEY": LEHNZ_KEY, "Content-Type": "application/json"}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CEILING_CONCURRENCY)
        )
        return {
            "batch": CEILING_BATCH,
            "concurrent_posts": CEILING_CONCURRENCY,
            "queue": "a list (unbounded)",
            "msgspec": msgspec.__version__,
            "aiohttp": aiohttp.__version__,
        }

    def burst(self, chunks: list[Chunk]) -> list[float]:
        append = self.events.append
        event = self._event
        families = FAMILIES
        perf_counter = time.perf_counter
        seconds = []
        for chunk in chunks:
            start = perf_counter()
            for user_id, event_name, item_id, context in zip(*chunk, strict=True):
                append(event(user_id, families[event_name], event_name, item_id, context))
            seconds.append(perf_counter() - start)
        return seconds

    async def flush(self) -> None:
        events, self.events = self.events, []
        starts = iter(range(0, len(events), CEILING_BATCH))  # shared by the senders

        async def sender() -> None:
            for lo in starts:
                body = self._encode(events[lo : lo + CEILING_BATCH])
                async with self._session.post(self._url, data=body, headers=self._headers) as resp:
                    await resp.read()
                    if resp.status != 202:
                        self.errors += len(events[lo : lo + CEILING_BATCH])

        await asyncio.gather(*(sender() for _ in range(CEILING_CONCURRENCY)))

    async def close(self) -> None:
        await self._session.close()


class NaiveDriver(Driver):
    async def start(self, sink: SinkClient, queue_size: int | None) -> dict[str, Any]:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=NAIVE_CONCURRENCY)
        )
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        url = sink.base_url + LEHNZ_PATH
        headers = {"X-API-KEY": LEHNZ_KEY}

        async def worker() -> None:
            while True:
                event = await self._queue.get()
                try:
                    async with self._session.post(url, json=[event], headers=headers) as resp:
                        await resp.read()
                        if resp.status != 202:
                            self.errors += 1
                except aiohttp.ClientError:
                    self.errors += 1
                finally:
                    self._queue.task_done()

        self._workers = [asyncio.create_task(worker()) for _ in range(NAIVE_CONCURRENCY)]
        return {
            "concurrent_posts": NAIVE_CONCURRENCY,
            "queue": "asyncio.Queue (unbounded)",
            "body": "json=[event] (json.dumps)",
            "aiohttp": aiohttp.__version__,
        }

    def burst(self, chunks: list[Chunk]) -> list[float]:
        put = self._queue.put_nowait
        families = FAMILIES
        perf_counter = time.perf_counter
        seconds = []
        for chunk in chunks:
            start = perf_counter()
            for user_id, event_name, item_id, context in zip(*chunk, strict=True):
                put(
                    {
                        "user_id": user_id,
                        "event_family": families[event_name],
                        "event_name": event_name,
                        "item_id": item_id,
                        "context": context,
                    }
                )
            seconds.append(perf_counter() - start)
        return seconds

    async def flush(self) -> None:
        await self._queue.join()

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self._session.close()


class SegmentDriver(Driver):
    def __init__(self) -> None:
        self.client: Any = None

    def _on_error(self, error: Exception, batch: list[Any]) -> None:
        self.errors += len(batch)

    async def start(self, sink: SinkClient, queue_size: int | None) -> dict[str, Any]:
        analytics: Any = importlib.import_module("segment.analytics")  # untyped
        client_type, version = analytics.Client, analytics.version.VERSION

        options: dict[str, Any] = {} if queue_size is None else {"max_queue_size": queue_size}
        self.client = client_type(
            SEGMENT_WRITE_KEY, host=sink.base_url, on_error=self._on_error, **options
        )
        config = defaults_of(
            client_type,
            ("upload_size", "upload_interval", "thread", "max_queue_size", "gzip", "sync_mode"),
        )
        config["max_queue_size"] = self.client.queue.maxsize
        return {"version": version, **config}

    def prepare(self, start: int, stop: int) -> Chunk:
        return peer_stream(start, stop)

    def burst(self, chunks: list[Chunk]) -> list[float]:
        track = self.client.track
        perf_counter = time.perf_counter
        seconds = []
        for chunk in chunks:
            start = perf_counter()
            for user_id, event_name, properties in zip(*chunk, strict=True):
                track(user_id, event_name, properties)
            seconds.append(perf_counter() - start)
        return seconds

    async def flush(self) -> None:
        self.client.flush()  # queue.join(): every batch taken and answered

    async def close(self) -> None:
        self.client.shutdown()

    def is_sending(self, since: int) -> bool:
        return bool(self.client.queue.qsize() > 0)

    def single_call(self, args: tuple[Any, ...]) -> int:
        user_id, event_name, properties = args
        track = self.client.track
        start = time.perf_counter_ns()
        track(user_id, event_name, properties)
        return time.perf_counter_ns() - start


class PostHogDriver(Driver):
    def __init__(self) -> None:
        self.client: Any = None

    def _on_error(self, error: Exception, batch: list[Any]) -> None:
        self.errors += len(batch)

    async def start(self, sink: SinkClient, queue_size: int | None) -> dict[str, Any]:
        posthog: Any = importlib.import_module("posthog")
        client_type, version = posthog.Posthog, posthog.version.VERSION

        options: dict[str, Any] = {} if queue_size is None else {"max_queue_size": queue_size}
        self.client = client_type(
            POSTHOG_API_KEY,
            host=sink.base_url,
            on_error=self._on_error,
            capture_mode="v0",  # its default, made explicit: POSTHOG_CAPTURE_MODE is ignored
            **options,
        )
        config = defaults_of(
            client_type,
            ("flush_at", "flush_interval", "thread", "max_queue_size", "gzip", "sync_mode"),
        )
        config.update(options)
        config["capture_mode"] = "v0"
        return {"version": version, **config}

    def prepare(self, start: int, stop: int) -> Chunk:
        return peer_stream(start, stop)

    def burst(self, chunks: list[Chunk]) -> list[float]:
        capture = self.client.capture
        perf_counter = time.perf_counter
        seconds = []
        for chunk in chunks:
            start = perf_counter()
            for user_id, event_name, properties in zip(*chunk, strict=True):
                capture(event_name, distinct_id=user_id, properties=properties)
            seconds.append(perf_counter() - start)
        return seconds

    async def flush(self) -> None:
        self.client.flush(timeout_seconds=None)  # its default is 10 s: too short here

    async def close(self) -> None:
        self.client.shutdown()

    def is_sending(self, since: int) -> bool:
        # The analytics lane's queue.Queue (posthog/client.py, _Lane.queue); read only.
        return bool(self.client._analytics_lane.queue.qsize() > 0)

    def single_call(self, args: tuple[Any, ...]) -> int:
        user_id, event_name, properties = args
        capture = self.client.capture
        start = time.perf_counter_ns()
        capture(event_name, distinct_id=user_id, properties=properties)
        return time.perf_counter_ns() - start


DRIVER_TYPES: dict[str, Callable[[], Driver]] = {
    "lehnz_async": LehnzDriver,
    "ceiling": CeilingDriver,
    "naive": NaiveDriver,
    "segment": SegmentDriver,
    "posthog": PostHogDriver,
}


# -- the modes ------------------------------------------------------------------------------


def _spin(ns: int) -> None:
    """Busy work: burn ``ns`` nanoseconds of CPU."""
    end = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < end:
        pass


def timer_overhead_ns(samples: int) -> list[int]:
    """Durations of an empty ``perf_counter_ns()`` pair: the floor of a probe."""
    perf_counter_ns = time.perf_counter_ns
    out = []
    for _ in range(samples):
        start = perf_counter_ns()
        out.append(perf_counter_ns() - start)
    return out


async def _warm_up(driver: Driver, warmup: int) -> None:
    """Send ``warmup`` events and flush them: connections open, code paths warm."""
    if warmup > 0:
        driver.burst([driver.prepare(0, warmup)])
        await driver.flush()


async def run(
    name: str,
    sink_url: str,
    events: int,
    mode: str = "burst",
    queue_size: int | None = None,
    warmup: int = 1000,
    probes: int = 10_000,
) -> dict[str, Any]:
    """Run one measurement; return its figures (a JSON-serializable dict)."""
    if mode == "paced" and name not in PACED_DRIVERS:
        raise SystemExit(f"{name} has no paced mode")
    if mode == "latency" and name not in LATENCY_DRIVERS:
        raise SystemExit(f"{name} has no latency mode")
    sink = SinkClient(sink_url)
    driver = DRIVER_TYPES[name]()
    config = await driver.start(sink, queue_size)
    await _warm_up(driver, warmup)
    base_dropped, base_failed = driver.counters()

    result: dict[str, Any] = {
        "driver": name,
        "mode": mode,
        "events": events,
        "warmup": warmup,
        "config": config,
        "pid": os.getpid(),
    }
    if mode == "paced":
        assert isinstance(driver, LehnzDriver)
        limit = int(config["max_queue_size"])
        gc.collect()
        sink_cpu = sink.reset()["cpu_seconds"]
        result["rss_baseline_bytes"] = rss_now()
        start = time.perf_counter()
        track_s, generation_s, chunk_s = await driver.paced(events, limit)
        await driver.flush()
        counts = sink.counts()
        wall = time.perf_counter() - start
        result.update(
            track_seconds=track_s,
            chunk_seconds=chunk_s,
            generation_seconds=generation_s,
            end_to_end_seconds=wall - generation_s,
            empty_loop_seconds=None,
        )
    else:
        chunks = [driver.prepare(lo, hi) for lo, hi in chunk_bounds(events, BURST_CHUNKS)]
        probe_args: list[tuple[Any, ...]] = []
        if mode == "latency":
            probe_args = list(zip(*driver.prepare(events, events + probes), strict=True))
            idle_args = list(zip(*driver.prepare(0, IDLE_PROBES), strict=True))
            idle, floor = await _probe_idle(driver, idle_args)
            result.update(idle_latency_ns=idle, floor_latency_ns=floor)
        empty_s = empty_loop_seconds(chunks)
        gc.collect()
        sink_cpu = sink.reset()["cpu_seconds"]
        result["rss_baseline_bytes"] = rss_now()
        start = time.perf_counter()
        chunk_s = driver.burst(chunks)
        result.update(
            track_seconds=sum(chunk_s),
            chunk_seconds=chunk_s,
            empty_loop_seconds=empty_s,
        )
        if mode == "latency":
            result.update(await _probe(driver, probe_args, chunks, events))
            if name in PEERS:
                # What is left of the burst would take seconds to deliver and is not
                # measured: the process ends without it (main() calls os._exit).
                result.update(abandoned=True, rss_peak_bytes=rss_peak())
                return result
        await driver.flush()
        counts = sink.counts()
        result["end_to_end_seconds"] = time.perf_counter() - start
    result["sink_at_flush"] = {k: v for k, v in counts.items() if k != "cpu_seconds"}
    result["sink_cpu_seconds"] = counts["cpu_seconds"] - sink_cpu
    await driver.close()
    result["rss_peak_bytes"] = rss_peak()
    dropped, failed = driver.counters()
    result["library_dropped"] = None if dropped is None else dropped - (base_dropped or 0)
    result["library_failed"] = None if failed is None else failed - (base_failed or 0)
    return result


async def _probe_idle(
    driver: Driver, probe_args: list[tuple[Any, ...]]
) -> tuple[list[int], list[int]]:
    """Time single calls as `_probe` does, but with nothing being sent meanwhile.

    Each call alternates with the same probe around a bare ``deque.append(args)``, the
    least a queueing call can do: the floor that this machine puts under any figure.
    Returns (call durations, floor durations), in nanoseconds.
    """
    await driver.flush()
    samples, floor = [], []
    bare: deque[tuple[Any, ...]] = deque()
    append = bare.append
    perf_counter_ns = time.perf_counter_ns
    for args in probe_args:
        _spin(PROBE_SPIN_NS)
        samples.append(driver.single_call(args))
        _spin(PROBE_SPIN_NS)
        start = perf_counter_ns()
        append(args)
        floor.append(perf_counter_ns() - start)
        if isinstance(driver, LehnzDriver):
            await asyncio.sleep(0)
    await driver.flush()
    return samples, floor


async def _probe(
    driver: Driver, probe_args: list[tuple[Any, ...]], chunks: list[Chunk], events: int
) -> dict[str, Any]:
    """Time single calls, each after ~50 µs of work, while a burst is being delivered.

    lehnz_async delivers a burst in a fraction of a second: each time it is done, the
    same burst is tracked again (not timed), so that every probe finds the flusher busy.
    """
    samples: list[int] = []
    lehnz = driver if isinstance(driver, LehnzDriver) else None
    since = events + (lehnz.tracker.stats.delivered if lehnz else 0)
    refills = 0
    single_call = driver.single_call
    start = time.perf_counter()
    for args in probe_args:
        if len(samples) % 64 == 0 and not driver.is_sending(since):
            if lehnz is None:
                break
            lehnz.burst(chunks)
            since += events
            refills += 1
        _spin(PROBE_SPIN_NS)
        samples.append(single_call(args))
        if lehnz is not None:
            await asyncio.sleep(0)  # the app's task yields: the flusher runs meanwhile
    return {
        "latency_ns": samples,
        "latency_seconds": time.perf_counter() - start,
        "latency_refills": refills,
        "timer_ns": timer_overhead_ns(len(samples)),
        "still_sending_at_end": driver.is_sending(since),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("driver", choices=DRIVERS)
    parser.add_argument("--sink", required=True, help="the sink's base URL (loopback)")
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, default="burst")
    parser.add_argument(
        "--queue-size", type=int, default=None, help="max queue size (default: the library's)"
    )
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up events, not measured")
    parser.add_argument("--probes", type=int, default=10_000, help="latency mode: most probes")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run(
            args.driver,
            args.sink,
            args.events,
            mode=args.mode,
            queue_size=args.queue_size,
            warmup=args.warmup,
            probes=args.probes,
        )
    )
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    if result.get("abandoned"):
        # Skip the peer's atexit hooks, which would wait for the rest of the burst.
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
