"""Benchmark of lehnz_async's Tracker against a local sink running in its own process.

    python benchmarks/bench_tracker.py [--events 100000] [--repeats 5] [--json]

Each repeat measures, in a fresh `Tracker`:

* the cost of one ``track()`` call: a tight loop of N calls over argument lists built
  beforehand (a fresh context dict per event), divided by N; the same loop with an empty
  body is timed too, so that its share is visible;
* end-to-end throughput: N divided by the time from the first ``track()`` call until
  ``aclose()`` has returned and the sink's ``GET /count`` shows all N events.

The sink's own capacity is measured as well (4 concurrent POSTs of a pre-encoded 500-event
array for a few seconds), so that one can check the sink is not what limits the figures.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import msgspec

import lehnz_async
from lehnz_async import Event, Tracker

SINK_SCRIPT = Path(__file__).with_name("sink.py")
INGEST_PATH = "/api/v1/events/ingest"
API_KEY = "lehnz_pk_bench"
EVENT_NAMES = ("view", "click", "view", "add_to_cart", "view", "purchase")
#: The families track() fills in for those names (for the pre-encoded blast body).
FAMILIES = {
    "view": "engagement",
    "click": "engagement",
    "add_to_cart": "engagement",
    "purchase": "conversion",
}
#: Events of the unreported warm-up run (fewer if --events is smaller).
WARMUP_EVENTS = 10_000
#: The sink capacity blast: concurrent POSTs and events per POST.
BLAST_CONCURRENCY = 4
BLAST_BATCH = 500
#: Seconds to wait for the sink to print READY, or to exit once told to.
SINK_START_TIMEOUT = 30.0
SINK_STOP_TIMEOUT = 10.0

Progress = Callable[[str], None]


# -- the workload -----------------------------------------------------------------------


class Workload(NamedTuple):
    """The arguments of N ``track()`` calls, one list per argument, built before timing."""

    user_ids: list[str]
    event_names: list[str]
    item_ids: list[str]
    contexts: list[dict[str, Any]]


def build_workload(n: int) -> Workload:
    return Workload(
        user_ids=[f"usr_{i % 1000:05d}" for i in range(n)],
        event_names=[EVENT_NAMES[i % len(EVENT_NAMES)] for i in range(n)],
        item_ids=[f"prod_{i % 5000:05d}" for i in range(n)],
        contexts=[{"position": i % 20, "page": "home"} for i in range(n)],
    )


def time_empty_loop(work: Workload) -> float:
    """Seconds taken by the driver loop of `track_burst` with nothing in its body."""
    start = time.perf_counter()
    for _user_id, _event_name, _item_id, _context in zip(*work, strict=True):
        pass
    return time.perf_counter() - start


def track_burst(tracker: Tracker, work: Workload) -> None:
    """Call ``track()`` once per event of ``work``, without yielding to the loop."""
    track = tracker.track
    for user_id, event_name, item_id, context in zip(*work, strict=True):
        track(user_id, event_name, item_id=item_id, context=context)


# -- the sink process -------------------------------------------------------------------


class Sink:
    """A running sink process and an HTTP session to query it."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url
        self.ingest_url = base_url + INGEST_PATH
        self._session = session

    async def counts(self) -> dict[str, Any]:
        """The sink's counters (see sink.Counts), and the CPU seconds it has used."""
        async with self._session.get(self.base_url + "/count") as resp:
            resp.raise_for_status()
            counts: dict[str, Any] = await resp.json()
            return counts

    async def reset(self) -> float:
        """Zero the counters; return the CPU seconds the sink has used so far."""
        async with self._session.post(self.base_url + "/reset") as resp:
            resp.raise_for_status()
            counts: dict[str, Any] = await resp.json()
            cpu_seconds: float = counts["cpu_seconds"]
            return cpu_seconds


@contextlib.asynccontextmanager
async def running_sink() -> AsyncIterator[Sink]:
    """Start benchmarks/sink.py with this interpreter; stop it by closing its stdin."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SINK_SCRIPT),
        "--exit-on-stdin-eof",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), SINK_START_TIMEOUT)
        if not line.startswith(b"READY "):
            raise RuntimeError(f"the sink did not start: it printed {line!r}")
        base_url = f"http://127.0.0.1:{int(line.split()[1])}"
        async with aiohttp.ClientSession() as session:
            yield Sink(base_url, session)
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), SINK_STOP_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


# -- one measurement of each kind -------------------------------------------------------


class TrackerRun(NamedTuple):
    """One repeat of the tracker benchmark."""

    events: int
    #: Seconds of the N track() calls, driver loop included.
    track_seconds: float
    #: Seconds of the same loop with an empty body.
    empty_loop_seconds: float
    #: Seconds from the first track() call to GET /count showing every event.
    end_to_end_seconds: float
    #: Events the sink counted.
    delivered: int
    #: The tracker's own counters after aclose().
    tracker_delivered: int
    failed: int
    dropped: int
    batches: int
    requests: int
    #: CPU seconds the sink used during the run (it idles until the first track()).
    sink_cpu_seconds: float

    @property
    def track_us(self) -> float:
        return self.track_seconds / self.events * 1e6

    @property
    def empty_loop_us(self) -> float:
        return self.empty_loop_seconds / self.events * 1e6

    @property
    def events_per_s(self) -> float:
        return self.events / self.end_to_end_seconds

    @property
    def drain_events_per_s(self) -> float:
        """The rate of delivery once the burst of track() calls was over."""
        return self.events / (self.end_to_end_seconds - self.track_seconds)

    @property
    def sink_busy(self) -> float:
        """The share of one core the sink used while the events were delivered."""
        return self.sink_cpu_seconds / self.end_to_end_seconds


async def run_tracker_once(sink: Sink, events: int) -> TrackerRun:
    """Track ``events`` events in one burst in a fresh Tracker, then close it."""
    work = build_workload(events)
    sink_cpu = await sink.reset()
    gc.collect()
    empty_loop_seconds = time_empty_loop(work)
    tracker = Tracker(
        API_KEY,
        endpoint=sink.ingest_url,
        max_queue_size=max(events, 100_000),  # the default, or more: nothing is dropped
    )
    start = time.perf_counter()
    track_burst(tracker, work)
    tracked = time.perf_counter()
    await tracker.aclose()
    counts = await sink.counts()
    done = time.perf_counter()
    stats = tracker.stats
    return TrackerRun(
        events=events,
        track_seconds=tracked - start,
        empty_loop_seconds=empty_loop_seconds,
        end_to_end_seconds=done - start,
        delivered=int(counts["events"]),
        tracker_delivered=stats.delivered,
        failed=stats.failed,
        dropped=stats.dropped,
        batches=stats.batches,
        requests=stats.requests,
        sink_cpu_seconds=counts["cpu_seconds"] - sink_cpu,
    )


class CapacityRun(NamedTuple):
    """One blast of pre-encoded arrays at the sink."""

    seconds: float
    events: int
    requests: int
    #: CPU seconds the sink used meanwhile.
    sink_cpu_seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    @property
    def sink_busy(self) -> float:
        """The share of one core the sink used: near 1.0 when it is the bottleneck."""
        return self.sink_cpu_seconds / self.seconds


async def measure_sink_capacity(sink: Sink, seconds: float) -> CapacityRun:
    """POST one pre-encoded 500-event array over and over, 4 at a time, for ``seconds``."""
    work = build_workload(BLAST_BATCH)
    body = msgspec.json.encode(
        [
            Event(user_id, FAMILIES[name], name, item_id, context=context)
            for user_id, name, item_id, context in zip(*work, strict=True)
        ]
    )
    headers = {"X-API-KEY": API_KEY, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=BLAST_CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post() -> None:
            async with session.post(sink.ingest_url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 202:
                    raise RuntimeError(f"the sink answered {resp.status}")

        await post()  # open a connection before timing
        sink_cpu = await sink.reset()

        async def blaster(deadline: float) -> None:
            while time.perf_counter() < deadline:
                await post()

        start = time.perf_counter()
        await asyncio.gather(*(blaster(start + seconds) for _ in range(BLAST_CONCURRENCY)))
        elapsed = time.perf_counter() - start
    counts = await sink.counts()
    return CapacityRun(
        elapsed,
        int(counts["events"]),
        int(counts["requests"]),
        counts["cpu_seconds"] - sink_cpu,
    )


# -- the whole benchmark ----------------------------------------------------------------


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "lehnz_async": lehnz_async.__version__,
        "aiohttp": aiohttp.__version__,
        "msgspec": msgspec.__version__,
    }


async def _run(
    events: int, repeats: int, sink_seconds: float, progress: Progress
) -> dict[str, Any]:
    tracker_runs: list[TrackerRun] = []
    capacity_runs: list[CapacityRun] = []
    async with running_sink() as sink:
        warmup = min(events, WARMUP_EVENTS)
        progress(f"warm-up: {warmup:,} events (not reported)")
        await run_tracker_once(sink, warmup)
        for i in range(1, repeats + 1):
            # Interleaved, so that both kinds of figure see the same machine noise.
            capacity = await measure_sink_capacity(sink, sink_seconds)
            capacity_runs.append(capacity)
            run = await run_tracker_once(sink, events)
            tracker_runs.append(run)
            progress(
                f"run {i}/{repeats}: sink capacity {capacity.events_per_s:,.0f} ev/s | "
                f"track() {run.track_us:.3f} µs | end-to-end {run.events_per_s:,.0f} ev/s | "
                f"delivered {run.delivered:,}/{events:,}"
            )

    tracker_metrics = {
        "track_us": [r.track_us for r in tracker_runs],
        "empty_loop_us": [r.empty_loop_us for r in tracker_runs],
        "track_net_us": [r.track_us - r.empty_loop_us for r in tracker_runs],
        "end_to_end_events_per_s": [r.events_per_s for r in tracker_runs],
        "drain_events_per_s": [r.drain_events_per_s for r in tracker_runs],
        "delivered_ratio": [r.delivered / events for r in tracker_runs],
        "dropped": [float(r.dropped) for r in tracker_runs],
        "failed": [float(r.failed) for r in tracker_runs],
        "batches": [float(r.batches) for r in tracker_runs],
        "sink_busy_percent": [r.sink_busy * 100 for r in tracker_runs],
    }
    capacity_metrics = {
        "events_per_s": [r.events_per_s for r in capacity_runs],
        "sink_busy_percent": [r.sink_busy * 100 for r in capacity_runs],
        "events_per_cpu_s": [r.events / r.sink_cpu_seconds for r in capacity_runs],
    }
    return {
        "environment": environment(),
        "config": {
            "events": events,
            "repeats": repeats,
            "warmup_events": min(events, WARMUP_EVENTS),
            "sink_seconds": sink_seconds,
            "sink_concurrency": BLAST_CONCURRENCY,
            "sink_batch": BLAST_BATCH,
        },
        "sink_capacity": {
            "runs": [
                {**r._asdict(), "events_per_s": r.events_per_s, "sink_busy": r.sink_busy}
                for r in capacity_runs
            ],
            "summary": {name: summarize(values) for name, values in capacity_metrics.items()},
        },
        "trackers": {
            "lehnz_async": {
                "runs": [
                    {
                        **r._asdict(),
                        "track_us": r.track_us,
                        "empty_loop_us": r.empty_loop_us,
                        "events_per_s": r.events_per_s,
                        "drain_events_per_s": r.drain_events_per_s,
                        "sink_busy": r.sink_busy,
                    }
                    for r in tracker_runs
                ],
                "summary": {name: summarize(values) for name, values in tracker_metrics.items()},
            }
        },
    }


def _no_progress(message: str) -> None:
    pass


def run(
    events: int = 100_000,
    repeats: int = 5,
    *,
    sink_seconds: float = 2.0,
    progress: Progress = _no_progress,
) -> dict[str, Any]:
    """Run the benchmark; return its figures as a JSON-serializable dict.

    Args:
        events: Events tracked per repeat.
        repeats: Repeats of each measurement (the sink capacity blast included).
        sink_seconds: Duration of each sink capacity blast.
        progress: Called with a line of text after each run.
    """
    if events < 1 or repeats < 1 or sink_seconds <= 0:
        raise ValueError("events and repeats must be at least 1, sink_seconds positive")
    return asyncio.run(_run(events, repeats, sink_seconds, progress))


# -- the report -------------------------------------------------------------------------

_TRACKER_ROWS = (  # (summary key, label, format)
    ("track_us", "track() µs per call, loop included", "{:.3f}"),
    ("empty_loop_us", "  of which empty driver loop, µs", "{:.3f}"),
    ("track_net_us", "track() µs per call, net of the loop", "{:.3f}"),
    ("end_to_end_events_per_s", "end-to-end events/s", "{:,.0f}"),
    ("drain_events_per_s", "  after the burst: delivery events/s", "{:,.0f}"),
    ("delivered_ratio", "delivered/N", "{:.4f}"),
    ("dropped", "dropped", "{:,.0f}"),
    ("failed", "failed", "{:,.0f}"),
    ("batches", "batches", "{:,.0f}"),
    ("sink_busy_percent", "sink CPU busy meanwhile, % of a core", "{:.0f}"),
)
_CAPACITY_ROWS = (
    ("events_per_s", "sink capacity, events/s", "{:,.0f}"),
    ("sink_busy_percent", "sink CPU busy meanwhile, % of a core", "{:.0f}"),
    ("events_per_cpu_s", "events per sink CPU second", "{:,.0f}"),
)
_STATS = ("median", "min", "max")


def _table(
    title: str, summary: dict[str, dict[str, float]], rows: tuple[tuple[str, str, str], ...]
) -> list[str]:
    width = max(len(label) for _, label, _ in _TRACKER_ROWS + _CAPACITY_ROWS)
    lines = [f"{title:<{width}}" + "".join(f"  {stat:>12}" for stat in _STATS)]
    for key, label, fmt in rows:
        lines.append(
            f"{label:<{width}}" + "".join(f"  {fmt.format(summary[key][s]):>12}" for s in _STATS)
        )
    return lines


def format_report(result: dict[str, Any]) -> str:
    """The human-readable report: a header, then median/min/max of every figure."""
    env, config = result["environment"], result["config"]
    return "\n".join(
        [
            f"lehnz_async {env['lehnz_async']}: {config['events']:,} events per run, "
            f"{config['repeats']} run(s) after a {config['warmup_events']:,}-event warm-up",
            f"{env['implementation']} {env['python']} | {env['cpu_count']} CPUs | "
            f"{env['platform']}",
            f"aiohttp {env['aiohttp']} | msgspec {env['msgspec']}",
            "",
            *_table(
                "lehnz_async Tracker",
                result["trackers"]["lehnz_async"]["summary"],
                _TRACKER_ROWS,
            ),
            "",
            *_table(
                f"sink blasted ({config['sink_concurrency']} x {config['sink_batch']} events, "
                f"{config['sink_seconds']:g} s)",
                result["sink_capacity"]["summary"],
                _CAPACITY_ROWS,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each measurement")
    parser.add_argument(
        "--sink-seconds", type=float, default=2.0, help="duration of each sink capacity run"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = run(args.events, args.repeats, sink_seconds=args.sink_seconds, progress=progress)
    print(json.dumps(result, indent=2) if args.json else format_report(result))


if __name__ == "__main__":
    main()
