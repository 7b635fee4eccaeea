"""One benchmark driver run in a process of its own; compare.py starts one per measurement.

    python benchmarks/drivers.py DRIVER --sink http://127.0.0.1:PORT --events N
        [--mode burst|paced|latency] [--queue-size Q] [--warmup W] [--probes P]

It prints one JSON object on stdout (see `run`); what the libraries log goes to stderr.
A process per measurement: its peak RSS belongs to one driver and one run, no driver
inherits another's heap, threads or connections, and each imports only what it uses.

lehnz_async, the ceiling and the naive driver each have a class; the peer SDKs share one
code path, `Peer`, with a small subclass per SDK (`PEERS`). The drivers, the modes and how each
peer is configured (and why) are described in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import importlib
import inspect
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

LEHNZ_PATH = "/api/v1/events/ingest"
LEHNZ_KEY = "lehnz_pk_bench"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
SINK_SCRIPT = Path(__file__).with_name("sink.py")

EVENT_NAMES = ("view", "click", "view", "add_to_cart", "view", "purchase")
#: The families lehnz_async fills in for those names (the ceiling and naive drivers send
#: them too, so that every driver of lehnz_async's format sends the same JSON).
FAMILIES = {
    "view": "engagement",
    "click": "engagement",
    "add_to_cart": "engagement",
    "purchase": "conversion",
}
BURST_CHUNKS = 10  # the timed burst is cut into 10 chunks (slowdown with queue depth)
PACED_CHUNK = 1000  # events per chunk of the paced mode
CEILING_BATCH, CEILING_CONCURRENCY = 500, 4  # lehnz_async's defaults
NAIVE_CONCURRENCY = 64
PROBE_SPIN_NS = 50_000  # latency mode: busy work before each timed call
IDLE_PROBES = 1000  # latency mode: calls timed with nothing to send

#: One chunk of a driver's call arguments: one list per argument, built before timing.
Chunk = tuple[list[Any], ...]


def make_stream(start: int, stop: int, peer: bool = False) -> Chunk:
    """Events ``start`` to ``stop`` of the stream, one list per argument, a fresh dict per
    event: (user ids, names, item ids, contexts), or for the peers (user ids, names,
    properties: the item id and the context's fields in one dict)."""
    indices = range(start, stop)
    users = [f"usr_{i % 1000:05d}" for i in indices]
    names = [EVENT_NAMES[i % len(EVENT_NAMES)] for i in indices]
    if peer:
        return (
            users,
            names,
            [
                {"item_id": f"prod_{i % 5000:05d}", "position": i % 20, "page": "home"}
                for i in indices
            ],
        )
    items = [f"prod_{i % 5000:05d}" for i in indices]
    return users, names, items, [{"position": i % 20, "page": "home"} for i in indices]


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


# -- the sink: started, and asked for its counters --------------------------------------------


class SinkClient:
    """Blocking GET /count and POST /reset on the sink (one small request each)."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
            raise SystemExit(f"the sink must be http:// on a loopback address, not {base_url}")
        self.base_url = base_url.rstrip("/")
        self._address = (parts.hostname, parts.port or 80)

    def _request(self, method: str, path: str) -> dict[str, Any]:
        conn = http.client.HTTPConnection(*self._address, timeout=30)
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
        """The counters of sink.Counts, ``cpu_seconds`` (the sink's, since it started) too."""
        return self._request("GET", "/count")

    def reset(self) -> dict[str, Any]:
        return self._request("POST", "/reset")


@contextlib.contextmanager
def running_sink(preexec_fn: Callable[[], Any] | None = None) -> Iterator[SinkClient]:
    """Start benchmarks/sink.py with this interpreter (``preexec_fn`` runs in the child
    before it starts: pinning it to a CPU, say); stop it by closing its stdin."""
    cmd = [sys.executable, str(SINK_SCRIPT), "--exit-on-stdin-eof"]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=preexec_fn
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = proc.stdout.readline()
        if not line.startswith(b"READY "):
            raise RuntimeError(f"the sink did not start: it printed {line!r}")
        yield SinkClient(f"http://127.0.0.1:{int(line.split()[1])}")
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _proc_status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), or None."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def rss_now() -> int:
    kb = _proc_status_kb("VmRSS")
    return rss_peak() if kb is None else kb * 1024


def rss_peak() -> int:
    """Peak RSS in bytes: ``VmHWM``, not ru_maxrss, which Linux carries across fork and
    exec (a child's is at least its parent's RSS); ru_maxrss only where there is no /proc."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def defaults_of(cls: Callable[..., Any], names: str) -> dict[str, Any]:
    """The defaults of some keyword parameters of ``cls`` (``names``, space-separated),
    read from its signature."""
    parameters = inspect.signature(cls).parameters
    return {name: parameters[name].default for name in names.split() if name in parameters}


# -- the drivers ------------------------------------------------------------------------------


class Driver:
    """One way of sending events. Its methods, in the order they run: `start` (create the
    client, return its effective configuration), then `prepare` (the argument lists of
    some events), `burst` (one `loop` per chunk: a call per event, never yielding) and
    `flush` (until everything tracked was sent, the library's own way), and `close`.
    Latency mode adds `single_call` (its duration in ns) and `is_sending` (whether events
    tracked are still waiting to be sent)."""

    #: Events reported as not delivered (on_error callbacks, non-2xx answers).
    errors = 0
    #: Whether it takes the peers' arguments (user id, name, properties).
    peer = False
    #: Whether it delivers from a task of the caller's event loop (then a prober yields
    #: after each call), rather than from a thread of its own.
    in_loop = True

    async def start(self, sink: SinkClient, queue_size: int | None) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, start: int, stop: int) -> Chunk:
        return make_stream(start, stop, self.peer)

    def loop(self, *lists: list[Any]) -> None: ...

    def burst(self, chunks: list[Chunk]) -> list[float]:
        seconds = []
        for chunk in chunks:
            start = time.perf_counter()
            self.loop(*chunk)
            seconds.append(time.perf_counter() - start)
        return seconds

    async def flush(self) -> None: ...

    async def close(self) -> None: ...

    def counters(self) -> tuple[int | None, int | None]:
        """(dropped, failed) as the library counts them; None where it does not."""
        return None, self.errors

    def is_sending(self) -> bool:
        raise NotImplementedError

    def single_call(self, args: tuple[Any, ...]) -> int:
        raise NotImplementedError


class LehnzDriver(Driver):
    async def start(self, sink: SinkClient, queue_size: int | None) -> dict[str, Any]:
        from lehnz_async import Tracker, __version__

        options: dict[str, Any] = {}
        if queue_size is not None:
            # "queues big enough to drop nothing": the count bound and the memory budget
            # (about 430 bytes an event of this stream is reckoned, with room to spare)
            options = {"max_queue_size": queue_size, "max_buffer_bytes": queue_size * 1024}
        self.tracker = Tracker(LEHNZ_KEY, endpoint=sink.base_url + LEHNZ_PATH, **options)
        await self.tracker.start()
        shown = (
            "max_batch_size max_concurrent_requests flush_interval max_queue_size "
            "max_buffer_bytes overflow"
        )
        config = defaults_of(Tracker, shown)
        return {"version": __version__, **config, **options}

    def loop(self, *lists: list[Any]) -> None:
        track = self.tracker.track
        for user_id, event_name, item_id, context in zip(*lists, strict=True):
            track(user_id, event_name, item_id=item_id, context=context)

    async def flush(self) -> None:
        await self.tracker.flush()

    async def close(self) -> None:
        await self.tracker.aclose()

    def counters(self) -> tuple[int | None, int | None]:
        stats = self.tracker.stats
        return stats.dropped, stats.failed

    def is_sending(self) -> bool:
        stats = self.tracker.stats
        return stats.queued + stats.in_flight > 0

    def single_call(self, args: tuple[Any, ...]) -> int:
        user_id, event_name, item_id, context = args
        track = self.tracker.track
        start = time.perf_counter_ns()
        track(user_id, event_name, item_id=item_id, context=context)
        return time.perf_counter_ns() - start

    async def paced(self, events: int, limit: int, max_bytes: int) -> tuple[list[float], float]:
        """Track ``events`` in chunks generated on the fly, with backpressure; return the
        seconds of each chunk's track() loop and the seconds spent generating events."""
        generation_seconds, chunk_seconds = 0.0, []
        for lo in range(0, events, PACED_CHUNK):
            hi = min(events, lo + PACED_CHUNK)
            started = time.perf_counter()
            chunk = make_stream(lo, hi)
            generation_seconds += time.perf_counter() - started
            # No room: let the flusher take batches (polling the public stats is the
            # only way an app can see the queue's depth and its memory budget).
            while (  # noqa: ASYNC110
                (stats := self.tracker.stats).queued + (hi - lo) > limit
                or stats.backlog_bytes > 0.9 * max_bytes
            ):
                await asyncio.sleep(0)
            chunk_seconds += self.burst([chunk])
            await asyncio.sleep(0)  # an app yields between requests
        return chunk_seconds, generation_seconds


class CeilingDriver(Driver):
    """What the tracker does with nothing else: a msgspec Struct per event appended to a
    list; then arrays of 500 encoded with one Encoder, POSTed 4 at a time."""

    async def start(self, sink: SinkClient, queue_size: int | None) -> dict[str, Any]:
        import aiohttp
        import msgspec

        class CeilingEvent(msgspec.Struct, omit_defaults=True, gc=False):
            """lehnz_async's wire event, less the fields the benchmark never sets."""

            user_id: str
            event_family: str
            event_name: str
            item_id: str | None = None
            context: dict[str, Any] | None = None

        self.events: list[Any] = []
        self._event, self._encode = CeilingEvent, msgspec.json.Encoder().encode
        self._url = sink.base_url + LEHNZ_PATH
        self._headers = {"X-API-KEY": LEHNZ_KEY, "Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=CEILING_CONCURRENCY)
        self._session = aiohttp.ClientSession(connector=connector)
        return {
            "batch": CEILING_BATCH,
            "concurrent_posts": CEILING_CONCURRENCY,
            "queue": "a list (unbounded)",
            "msgspec": msgspec.__version__,
            "aiohttp": aiohttp.__version__,
        }

    def loop(self, *lists: list[Any]) -> None:
        append, event, families = self.events.append, self._event, FAMILIES
        for user_id, event_name, item_id, context in zip(*lists, strict=True):
            append(event(user_id, families[event_name], event_name, item_id, context))

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
    """The naive "one aiohttp POST per event": the call puts a dict on an unbounded asyncio.Queue;
    64 worker tasks each POST one event (``json=[event]``) on one session."""

    async def start(self, sink: SinkClient, queue_size: int | None) -> dict[str, Any]:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=NAIVE_CONCURRENCY)
        self._session = aiohttp.ClientSession(connector=connector)
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        url, headers = sink.base_url + LEHNZ_PATH, {"X-API-KEY": LEHNZ_KEY}

        async def worker() -> None:
            while True:
                event = await self._queue.get()
                try:
                    async with self._session.post(url, json=[event], headers=headers) as resp:
                        await resp.read()
                        self.errors += resp.status != 202
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

    def loop(self, *lists: list[Any]) -> None:
        put, families = self._queue.put_nowait, FAMILIES
        for user_id, event_name, item_id, context in zip(*lists, strict=True):
            put(
                {
                    "user_id": user_id,
                    "event_family": families[event_name],
                    "event_name": event_name,
                    "item_id": item_id,
                    "context": context,
                }
            )

    async def flush(self) -> None:
        await self._queue.join()

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self._session.close()


# -- the peer SDKs: one code path (`Peer`), a small class per SDK ----------------------------


class Peer(Driver):
    """A peer SDK, built as its own defaults say; its subclass says what differs (see
    benchmarks/README.md for the source lines each is based on)."""

    peer, in_loop = True, False
    module = client_class = key = path = ""  # where the class is, its key, where it POSTs
    options: ClassVar[dict[str, Any]] = {}  # set besides host, on_error and max_queue_size
    shown = ""  # parameters whose defaults the report prints, read from the signature
    requires: tuple[str, ...] = ()  # modules it needs installed

    def _on_error(self, error: Exception, batch: list[Any]) -> None:
        self.errors += len(batch)

    async def start(self, sink: SinkClient, queue_size: int | None) -> dict[str, Any]:
        client_type = getattr(importlib.import_module(self.module), self.client_class)
        options = dict(self.options)
        if queue_size is not None:
            options["max_queue_size"] = queue_size
        self.client = client_type(self.key, host=sink.base_url, on_error=self._on_error, **options)
        self.call = self.make_call()
        version = importlib.import_module(self.module + ".version").VERSION
        return {"version": version, **defaults_of(client_type, self.shown), **options}

    def make_call(self) -> Callable[[str, str, dict[str, Any]], Any]:
        """call(user_id, event_name, properties): the SDK's own call on those fields."""
        raise NotImplementedError

    def loop(self, *lists: list[Any]) -> None:
        call = self.call
        for user_id, event_name, properties in zip(*lists, strict=True):
            call(user_id, event_name, properties)

    def single_call(self, args: tuple[Any, ...]) -> int:
        user_id, event_name, properties = args
        call = self.call
        start = time.perf_counter_ns()
        call(user_id, event_name, properties)
        return time.perf_counter_ns() - start

    def backlog(self) -> int:
        """Events queued, not yet taken by its consumer."""
        raise NotImplementedError

    def is_sending(self) -> bool:
        return self.backlog() > 0


class Segment(Peer):
    module, client_class, key, path = "segment.analytics", "Client", "bench_write_key", "/v1/batch"
    shown = "upload_size upload_interval thread max_queue_size gzip sync_mode"
    requires = ("segment",)

    def make_call(self) -> Callable[[str, str, dict[str, Any]], Any]:
        track: Callable[[str, str, dict[str, Any]], Any] = self.client.track
        return track  # track(user_id, event, properties)

    async def flush(self) -> None:
        self.client.flush()  # queue.join(): every batch taken and answered

    async def close(self) -> None:
        self.client.shutdown()

    def backlog(self) -> int:
        return int(self.client.queue.qsize())


class PostHog(Peer):
    module, client_class, key, path = "posthog", "Posthog", "phc_bench", "/batch/"
    # its default, made explicit, so that the POSTHOG_CAPTURE_MODE variable cannot change it
    options: ClassVar[dict[str, Any]] = {"capture_mode": "v0"}
    shown = "flush_at flush_interval thread max_queue_size gzip sync_mode max_retries"
    requires: tuple[str, ...] = ("posthog",)

    def make_call(self) -> Callable[[str, str, dict[str, Any]], Any]:
        capture = self.client.capture  # capture(event, **kwargs): distinct_id by keyword

        def call(user_id: str, event_name: str, properties: dict[str, Any]) -> Any:
            return capture(event_name, distinct_id=user_id, properties=properties)

        return call

    async def flush(self) -> None:
        self.client.flush(timeout_seconds=None)  # its default, 10 s, would give up

    async def close(self) -> None:
        self.client.shutdown()

    def backlog(self) -> int:
        return int(self.client._analytics_lane.queue.qsize())


class PostHogAsync(PostHog):
    """posthog.AsyncPosthog: the same capture(), flush and shutdown awaited; its consumer
    is a task of the caller's loop."""

    client_class, in_loop, requires = "AsyncPosthog", True, ("posthog", "httpx")

    async def flush(self) -> None:
        await self.client.flush(timeout_seconds=None)

    async def close(self) -> None:
        await self.client.shutdown()

    def backlog(self) -> int:
        return int(self.client._queue.qsize())


PEERS: dict[str, type[Peer]] = {
    "segment": Segment,
    "posthog": PostHog,
    "posthog_async": PostHogAsync,
}
DRIVER_TYPES: dict[str, Callable[[], Driver]] = {
    "lehnz_async": LehnzDriver,
    "ceiling": CeilingDriver,
    "naive": NaiveDriver,
    **PEERS,
}
DRIVERS = tuple(DRIVER_TYPES)
LATENCY_DRIVERS = ("lehnz_async", *PEERS)  # also those of scenario 2 (they have a queue)


# -- the modes --------------------------------------------------------------------------------


def _spin(ns: int) -> None:
    """Busy work: burn ``ns`` nanoseconds of CPU."""
    end = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < end:
        pass


def timer_overhead_ns(samples: int) -> list[int]:
    """Durations of an empty ``perf_counter_ns()`` pair: the floor of a probe."""
    perf_counter_ns, out = time.perf_counter_ns, []
    for _ in range(samples):
        start = perf_counter_ns()
        out.append(perf_counter_ns() - start)
    return out


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
    if (mode == "paced" and name != "lehnz_async") or (
        mode == "latency" and name not in LATENCY_DRIVERS
    ):
        raise SystemExit(f"{name} has no {mode} mode")
    sink, driver = SinkClient(sink_url), DRIVER_TYPES[name]()
    config = await driver.start(sink, queue_size)
    if warmup > 0:  # connections open, code paths warm
        driver.burst([driver.prepare(0, warmup)])
        await driver.flush()
    base_dropped, base_failed = driver.counters()
    result: dict[str, Any] = {
        "driver": name,
        "mode": mode,
        "events": events,
        "warmup": warmup,
        "config": config,
        "pid": os.getpid(),
        "empty_loop_seconds": None,
    }
    # paced: the events are generated on the fly, a chunk at a time
    bounds = chunk_bounds(events, BURST_CHUNKS) if mode != "paced" else []
    chunks = [driver.prepare(lo, hi) for lo, hi in bounds]
    if mode == "latency":
        probe_args = list(zip(*driver.prepare(events, events + probes), strict=True))
        idle_args = list(zip(*driver.prepare(0, IDLE_PROBES), strict=True))
        idle, floor = await _probe_idle(driver, idle_args)
        result.update(idle_latency_ns=idle, floor_latency_ns=floor)
    if chunks:
        result["empty_loop_seconds"] = empty_loop_seconds(chunks)
    gc.collect()
    sink_cpu = sink.reset()["cpu_seconds"]
    result["rss_baseline_bytes"] = rss_now()
    start = time.perf_counter()
    if isinstance(driver, LehnzDriver) and mode == "paced":
        chunk_s, generation_s = await driver.paced(
            events, config["max_queue_size"], config["max_buffer_bytes"]
        )
    else:
        chunk_s, generation_s = driver.burst(chunks), 0.0
    result.update(track_seconds=sum(chunk_s), chunk_seconds=chunk_s)
    if mode == "latency":
        result.update(await _probe(driver, probe_args, chunks))
        if isinstance(driver, Peer):
            # What is left of the burst would take seconds to deliver and is not
            # measured: the process ends without it (main() calls os._exit).
            return {**result, "abandoned": True, "rss_peak_bytes": rss_peak()}
    await driver.flush()
    counts = sink.counts()
    # paced: the time spent generating events is not the library's
    result["end_to_end_seconds"] = time.perf_counter() - start - generation_s
    result["generation_seconds"] = generation_s
    result["sink_at_flush"] = {k: v for k, v in counts.items() if k != "cpu_seconds"}
    result["sink_cpu_seconds"] = counts["cpu_seconds"] - sink_cpu
    if isinstance(driver, LehnzDriver):
        result["tracker_stats"] = driver.tracker.stats._asdict()
    await driver.close()
    result["rss_peak_bytes"] = rss_peak()
    dropped, failed = driver.counters()
    result["library_dropped"] = None if dropped is None else dropped - (base_dropped or 0)
    result["library_failed"] = None if failed is None else failed - (base_failed or 0)
    return result


async def _probe_idle(driver: Driver, args: list[tuple[Any, ...]]) -> tuple[list[int], list[int]]:
    """Time single calls as `_probe` does, with nothing being sent meanwhile; each
    alternating with the same probe around a bare ``deque.append(args)``, the least a
    queueing call can do. Returns (call durations, floor durations), in nanoseconds."""
    await driver.flush()
    samples, floor = [], []
    append = deque[tuple[Any, ...]]().append
    perf_counter_ns = time.perf_counter_ns
    for one in args:
        _spin(PROBE_SPIN_NS)
        samples.append(driver.single_call(one))
        _spin(PROBE_SPIN_NS)
        start = perf_counter_ns()
        append(one)
        floor.append(perf_counter_ns() - start)
        if driver.in_loop:
            await asyncio.sleep(0)
    await driver.flush()
    return samples, floor


async def _probe(
    driver: Driver, args: list[tuple[Any, ...]], chunks: list[Chunk]
) -> dict[str, Any]:
    """Time single calls, each after ~50 µs of work, while a burst is being delivered.

    A driver that delivers from the loop (lehnz_async, posthog_async) gets the same burst
    again (not timed) each time it is done, so that every probe finds its sender busy;
    a thread-based peer's probing stops when its queue is empty.
    """
    samples: list[int] = []
    refills = 0
    single_call = driver.single_call
    start = time.perf_counter()
    for one in args:
        if len(samples) % 64 == 0 and not driver.is_sending():
            if not driver.in_loop:
                break
            driver.burst(chunks)
            refills += 1
        _spin(PROBE_SPIN_NS)
        samples.append(single_call(one))
        if driver.in_loop:
            await asyncio.sleep(0)  # the app's task yields: the sender runs meanwhile
    return {
        "latency_ns": samples,
        "latency_seconds": time.perf_counter() - start,
        "latency_refills": refills,
        "timer_ns": timer_overhead_ns(len(samples)),
        "still_sending_at_end": driver.is_sending(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("driver", choices=DRIVERS)
    parser.add_argument("--sink", required=True, help="the sink's base URL (loopback)")
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--mode", choices=("burst", "paced", "latency"), default="burst")
    parser.add_argument("--queue-size", type=int, help="max queue size (default: the library's)")
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up events, not measured")
    parser.add_argument("--probes", type=int, default=10_000, help="latency mode: most probes")
    kwargs = vars(parser.parse_args(argv))
    result = asyncio.run(run(kwargs.pop("driver"), kwargs.pop("sink"), **kwargs))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    if result.get("abandoned"):
        # Skip the peer's atexit hooks, which would wait for the rest of the burst.
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()


def git_commit(root: Path) -> str | None:
    """The commit of the repository at ``root``, with "+dirty" if its lehnz_async/ has
    uncommitted changes (None outside a repository)."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--", "lehnz_async"):
        commit += "+dirty"
    return commit
