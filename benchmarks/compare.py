"""lehnz_async against Segment, PostHog (threaded and asyncio), a naive POST per event and the
practical ceiling.

    python benchmarks/compare.py                # the full comparison (a few minutes)
    python benchmarks/compare.py --quick        # lehnz_async alone: track() µs, events/s
    python benchmarks/compare.py --smoke        # seconds: tiny N, no peers (what CI runs)
    python benchmarks/compare.py --json > result.json

Everything runs on loopback: a sink (benchmarks/sink.py) in its own process, its capacity
measured, then each measurement in a driver process of its own (benchmarks/drivers.py):
scenario 1 (a burst, queues big enough to drop nothing), scenario 2 (each library's default
queue), scaling (lehnz_async) and single-call latency. See benchmarks/README.md for what
every figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import msgspec
from drivers import (
    DRIVERS,
    LATENCY_DRIVERS,
    LEHNZ_KEY,
    LEHNZ_PATH,
    PEERS,
    SinkClient,
    git_commit,
    running_sink,
)

import lehnz_async

DRIVERS_SCRIPT = Path(__file__).with_name("drivers.py")
#: Seconds one driver process may take before it is killed (and the benchmark fails).
DRIVER_TIMEOUT = 600.0
#: Sink capacity blasts: (label, events per POST, POSTs in flight).
BLASTS = (("4 x 500-event arrays", 500, 4), ("64 x 1-event POSTs", 1, 64))


class Options(NamedTuple):
    """What to run (the command-line options; see benchmarks/README.md)."""

    events: int = 100_000  # per burst of scenarios 1 and 2
    naive_events: int = 20_000  # per run of the naive driver (a few thousand per second)
    repeats: int = 3  # rounds of scenario 1
    other_repeats: int = 3  # rounds of scenario 2, of scaling and of latency (0: none)
    drivers: tuple[str, ...] = DRIVERS
    scaling_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    latency_events: int = 20_000  # the burst delivered while single calls are timed
    probes: int = 5_000  # most calls timed per latency run
    sink_seconds: float = 1.0  # per sink capacity blast
    warmup: int = 1_000  # events each driver sends and flushes before it is measured


DEFAULTS = Options()
SMOKE = Options(
    events=2_000,
    naive_events=300,
    repeats=1,
    other_repeats=1,
    drivers=tuple(d for d in DRIVERS if d not in PEERS),
    scaling_sizes=(2_000,),
    latency_events=2_000,
    probes=200,
    sink_seconds=0.2,
    warmup=200,
)


# -- running things ---------------------------------------------------------------------------


def run_driver(
    sink: SinkClient,
    driver: str,
    events: int,
    mode: str = "burst",
    queue_size: int | None = None,
    opts: Options = DEFAULTS,
) -> dict[str, Any]:
    """Run one driver process; return its result with the sink's final counters added."""
    args = [sys.executable, str(DRIVERS_SCRIPT), driver, "--sink", sink.base_url]
    args += ["--events", str(events), "--mode", mode, "--warmup", str(opts.warmup)]
    args += ["--probes", str(opts.probes)]
    if queue_size is not None:
        args += ["--queue-size", str(queue_size)]
    # The peers' own environment variables could change their wire protocol.
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTHOG_")}
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.run(
            args, stdout=subprocess.PIPE, stderr=stderr, env=env, timeout=DRIVER_TIMEOUT
        )
        if proc.returncode != 0:
            stderr.seek(0)
            tail = stderr.read()[-3000:].decode("utf-8", "replace")
            raise RuntimeError(f"{driver} ({mode}) exited with {proc.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(proc.stdout)
    # Read after the process has gone: whatever arrived after its flush returned counts.
    result["sink_final"] = {k: v for k, v in sink.counts().items() if k != "cpu_seconds"}
    return result


async def blast(sink: SinkClient, batch: int, concurrency: int, seconds: float) -> dict[str, float]:
    """POST one pre-encoded body of ``batch`` events over and over, ``concurrency`` at a
    time, for ``seconds``; return the sink's rate and CPU use meanwhile."""
    event = {"user_id": "usr_00001", "event_family": "engagement", "event_name": "view"}
    body = json.dumps(
        [
            {**event, "item_id": f"prod_{i:05d}", "context": {"position": i % 20}}
            for i in range(batch)
        ]
    ).encode()
    headers = {"X-API-KEY": LEHNZ_KEY, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post() -> None:
            async with session.post(sink.base_url + LEHNZ_PATH, data=body, headers=headers) as r:
                await r.read()
                if r.status != 202:
                    raise RuntimeError(f"the sink answered {r.status}")

        async def blaster(deadline: float) -> None:
            while time.perf_counter() < deadline:
                await post()

        await asyncio.gather(*(post() for _ in range(concurrency)))  # open the connections
        cpu = sink.reset()["cpu_seconds"]
        start = time.perf_counter()
        await asyncio.gather(*(blaster(start + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    counts = sink.counts()
    sink_cpu = counts["cpu_seconds"] - cpu
    return {
        "events_per_s": counts["events"] / elapsed,
        "requests_per_s": counts["requests"] / elapsed,
        "sink_busy_percent": sink_cpu / elapsed * 100,
        "events_per_sink_cpu_s": counts["events"] / sink_cpu,
    }


def rotated(items: Sequence[Any], r: int) -> list[Any]:
    """``items`` starting at position ``r`` (mod its length): round r's order."""
    k = r % len(items) if items else 0
    return [*items[k:], *items[:k]]


def measure(opts: Options, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every run, in order; the raw results."""
    queued = [d for d in opts.drivers if d in LATENCY_DRIVERS]
    raw: dict[str, Any] = {
        "capacity": {label: [] for label, _, _ in BLASTS},
        "scenario1": {d: [] for d in opts.drivers},
        "scenario2": {d: [] for d in queued},
        "scaling": {f"{m} {n}": [] for m in ("burst", "paced") for n in opts.scaling_sizes},
        "latency": {d: [] for d in queued},
    }
    started = time.perf_counter()

    def record(section: dict[str, Any], key: str, res: dict[str, Any], what: str) -> None:
        section.setdefault(key, []).append(res)
        if "latency_ns" in res:
            lat = sorted(res["latency_ns"])
            brief = f"{len(lat):,} calls, p50 {_pct(lat, 50) / 1000:.2f} µs, "
            brief += f"p99 {_pct(lat, 99) / 1000:.2f} µs"
        else:
            n = res["events"]
            brief = f"track() {res['track_seconds'] / n * 1e6:.3f} µs, "
            brief += f"{n / res['end_to_end_seconds']:,.0f} events/s, "
            brief += f"delivered {res['sink_final']['events']:,}/{n:,}"
        progress(f"[{time.perf_counter() - started:6.1f} s] {what}, {key}: {brief}")

    scaling = [(m, n) for n in opts.scaling_sizes for m in ("burst", "paced")]
    scaling = scaling if "lehnz_async" in opts.drivers else []
    with running_sink() as sink:
        for r in range(opts.repeats):
            for label, batch, concurrency in BLASTS:
                cap = asyncio.run(blast(sink, batch, concurrency, opts.sink_seconds))
                raw["capacity"][label].append(cap)
                progress(f"round {r + 1}: sink, {label}: {cap['events_per_s']:,.0f} events/s")
            for d in rotated(opts.drivers, r):
                n = opts.naive_events if d == "naive" else opts.events
                res = run_driver(sink, d, n, queue_size=max(n, 100_000), opts=opts)
                record(raw["scenario1"], d, res, f"round {r + 1}: scenario 1")
        for r in range(opts.other_repeats):
            for d in rotated(queued, r):
                res = run_driver(sink, d, opts.events, opts=opts)
                record(raw["scenario2"], d, res, f"round {r + 1}: scenario 2 (default queue)")
        for r in range(opts.other_repeats):
            for mode, n in rotated(scaling, r):
                size = max(n, 100_000) if mode == "burst" else None
                res = run_driver(sink, "lehnz_async", n, mode, size, opts)
                record(raw["scaling"], f"{mode} {n}", res, f"round {r + 1}: scaling")
        for r in range(opts.other_repeats):
            for d in rotated(queued, r):
                size = max(opts.latency_events, 100_000)
                res = run_driver(sink, d, opts.latency_events, "latency", size, opts)
                record(raw["latency"], d, res, f"round {r + 1}: latency")
    raw["seconds"] = time.perf_counter() - started
    return raw


# -- figures ----------------------------------------------------------------------------------


def _pct(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = math.ceil(p / 100 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, rank))]


def summarize(values: Iterable[float]) -> dict[str, float]:
    vs = list(values)
    return {"median": statistics.median(vs), "min": min(vs), "max": max(vs)}


def run_figures(res: dict[str, Any]) -> dict[str, float]:
    """The figures of one burst (or paced) run."""
    n, final, e2e, chunks = (
        res["events"],
        res["sink_final"],
        res["end_to_end_seconds"],
        res["chunk_seconds"],
    )
    delivered, failed, dropped = final["events"], res["library_failed"] or 0, res["library_dropped"]
    if dropped is None:  # the peers count no drops we can read: what never arrived
        dropped = n - delivered - failed
    per_chunk = n / len(chunks) if res["mode"] == "burst" else 1000
    per_event = (lambda x: x / delivered) if delivered else (lambda x: float("nan"))
    figures = {
        "events": n,
        "track_us": res["track_seconds"] / n * 1e6,
        "events_per_s": n / e2e,
        "drain_events_per_s": n / max(e2e - res["track_seconds"], 1e-9),
        "delivered": delivered,
        "delivered_ratio": delivered / n,
        "dropped": dropped,
        "dropped_percent": dropped / n * 100,
        "failed": failed,
        "peak_rss_mb": res["rss_peak_bytes"] / 2**20,
        "rss_growth_mb": (res["rss_peak_bytes"] - res["rss_baseline_bytes"]) / 2**20,
        "body_bytes_per_event": per_event(final["bytes"]),
        "wire_bytes_per_event": per_event(final["bytes"] + final["header_bytes"]),
        "events_per_request": delivered / final["requests"] if final["requests"] else 0.0,
        "sink_busy_percent": res["sink_cpu_seconds"] / e2e * 100,
        "first_chunk_us": chunks[0] / per_chunk * 1e6,
        "last_chunk_us": chunks[-1] / per_chunk * 1e6,
        "late_events": delivered - res["sink_at_flush"]["events"],
        "rejected": final["rejected"],
    }
    if res["empty_loop_seconds"] is not None:
        figures["empty_loop_us"] = res["empty_loop_seconds"] / n * 1e6
        figures["track_net_us"] = figures["track_us"] - figures["empty_loop_us"]
    return figures


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    figures = [run_figures(res) for res in runs]
    return {key: summarize(f[key] for f in figures) for key in figures[0]}


#: Ratios of lehnz_async to another driver: (key, figure, lehnz on top, label).
RATIOS = (
    ("track_cost", "track_us", False, "track() cost: other ÷ lehnz (x cheaper)"),
    ("throughput", "events_per_s", True, "end-to-end: lehnz ÷ other (x faster)"),
    ("peak_rss", "peak_rss_mb", True, "peak RSS: lehnz ÷ other"),
    ("wire_bytes", "wire_bytes_per_event", True, "wire bytes/event: lehnz ÷ other"),
)


def ratios(lehnz: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios computed round by round (the two ran in the same round), then summarized."""
    pairs = [(run_figures(a), run_figures(b)) for a, b in zip(lehnz, other, strict=False)]
    return {
        key: summarize(a[fig] / b[fig] if top else b[fig] / a[fig] for a, b in pairs)
        for key, fig, top, _ in RATIOS
    }


def latency_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Percentiles of the pooled single-call samples of all runs, in µs."""

    def pooled(key: str) -> list[int]:
        return sorted(v for res in runs for v in res[key])

    busy, idle = pooled("latency_ns"), pooled("idle_latency_ns")
    floor, timer = pooled("floor_latency_ns"), pooled("timer_ns")
    return {
        "calls": len(busy),
        "p50_us": _pct(busy, 50) / 1000,
        "p99_us": _pct(busy, 99) / 1000,
        "p999_us": _pct(busy, 99.9) / 1000,
        "max_us": busy[-1] / 1000,
        "idle_p50_us": _pct(idle, 50) / 1000,
        "idle_p99_us": _pct(idle, 99) / 1000,
        "floor_p50_us": _pct(floor, 50) / 1000,
        "floor_p99_us": _pct(floor, 99) / 1000,
        "timer_p50_us": _pct(timer, 50) / 1000,
        "p99_per_run_us": [_pct(sorted(res["latency_ns"]), 99) / 1000 for res in runs],
        "still_sending_at_end": sum(bool(res["still_sending_at_end"]) for res in runs),
        "refills": sum(res["latency_refills"] for res in runs),
    }


def analyse(raw: dict[str, Any]) -> dict[str, Any]:
    """Every summary the report prints, from the raw results."""
    s1 = raw["scenario1"]
    return {
        "capacity": {
            label: {key: summarize(run[key] for run in runs) for key in runs[0]}
            for label, runs in raw["capacity"].items()
        },
        "scenario1": {d: summarize_runs(runs) for d, runs in s1.items()},
        "scenario2": {d: summarize_runs(runs) for d, runs in raw["scenario2"].items() if runs},
        "scaling": {case: summarize_runs(runs) for case, runs in raw["scaling"].items() if runs},
        "latency": {d: latency_figures(runs) for d, runs in raw["latency"].items() if runs},
        "ratios": {
            d: ratios(s1["lehnz_async"], runs) for d, runs in s1.items() if d != "lehnz_async"
        }
        if "lehnz_async" in s1
        else {},
        "configs": {d: runs[0]["config"] for d, runs in s1.items()},
        "default_configs": {d: runs[0]["config"] for d, runs in raw["scenario2"].items() if runs},
    }


# -- the report -------------------------------------------------------------------------------

CAPACITY = (  # (header, figure, format) of each table's columns
    ("events/s", "events_per_s", "k"),
    ("requests/s", "requests_per_s", "k"),
    ("sink CPU %", "sink_busy_percent", "{:.0f}"),
    ("events per sink CPU s", "events_per_sink_cpu_s", "k"),
)
SCENARIO1 = (
    ("events", "events", "{:,.0f}"),
    ("track() µs/call", "track_us", "{:.3f}"),
    ("empty loop µs", "empty_loop_us", "{:.3f}"),
    ("end-to-end events/s", "events_per_s", "k"),
    ("after-burst events/s", "drain_events_per_s", "k"),
    ("sink CPU %", "sink_busy_percent", "{:.0f}"),
)
SCENARIO1_MORE = (
    ("delivered/sent", "delivered_ratio", "{:.4f}"),
    ("dropped", "dropped", "{:,.0f}"),
    ("failed", "failed", "{:,.0f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.1f}"),
    ("RSS growth MB", "rss_growth_mb", "{:.1f}"),
    ("body B/event", "body_bytes_per_event", "{:.1f}"),
    ("wire B/event", "wire_bytes_per_event", "{:.1f}"),
    ("events/request", "events_per_request", "{:.0f}"),
)
SCENARIO2 = (
    ("delivered", "delivered", "{:,.0f}"),
    ("dropped", "dropped", "{:,.0f}"),
    ("dropped %", "dropped_percent", "{:.1f}"),
    ("failed", "failed", "{:,.0f}"),
    ("track() µs/call", "track_us", "{:.3f}"),
    ("end-to-end events/s", "events_per_s", "k"),
)
SCALING = (
    ("track() µs/call", "track_us", "{:.3f}"),
    ("first 10% µs", "first_chunk_us", "{:.3f}"),
    ("last 10% µs", "last_chunk_us", "{:.3f}"),
    ("end-to-end events/s", "events_per_s", "k"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ("RSS growth MB", "rss_growth_mb", "{:.0f}"),
    ("dropped", "dropped", "{:,.0f}"),
    ("delivered/sent", "delivered_ratio", "{:.4f}"),
)
LATENCY = tuple(
    (header, key, "{:,}" if key == "calls" else "{:.0f}" if key == "max_us" else "{:.2f}")
    for header, key in (
        ("calls", "calls"),
        ("p50", "p50_us"),
        ("p99", "p99_us"),
        ("p99.9", "p999_us"),
        ("max", "max_us"),
        ("idle p50", "idle_p50_us"),
        ("idle p99", "idle_p99_us"),
        ("floor p50", "floor_p50_us"),
        ("floor p99", "floor_p99_us"),
        ("timer p50", "timer_p50_us"),
    )
)


def _num(value: float, fmt: str) -> str:
    if fmt == "k":  # thousands, compact
        return f"{value / 1000:,.0f}k" if value >= 10_000 else f"{value:,.0f}"
    return fmt.format(value)


def cell(stats: dict[str, float], fmt: str) -> str:
    """'median [min-max]', or the median alone when all runs agree."""
    med, lo, hi = (_num(stats[k], fmt) for k in ("median", "min", "max"))
    return med if lo == hi else f"{med} [{lo}-{hi}]"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    return [
        title,
        *(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in [header, *rows]
        ),
        "",
    ]


def figure_table(
    title: str,
    first: str,
    columns: Sequence[tuple[str, str, str]],
    items: dict[str, dict[str, Any]],
    show: Callable[[Any, str], str] = cell,
) -> list[str]:
    """A table of figures: a row per item, a column per (header, figure, format)."""
    if not items:
        return []
    rows = [[name, *(show(f[key], fmt) for _, key, fmt in columns)] for name, f in items.items()]
    return table(title, [first, *(header for header, _, _ in columns)], rows)


def format_report(result: dict[str, Any]) -> str:
    env, opts, summary = result["environment"], result["options"], result["summary"]
    s1, n, other = summary["scenario1"], f"{opts['events']:,}", opts["other_repeats"]
    peers = [f"{d} {c['version']}" for d, c in summary["configs"].items() if d in PEERS]
    lines = [
        f"lehnz_async {env['lehnz_async']} (commit {env['commit']}) | {env['implementation']} "
        f"{env['python']} | {env['cpu_count']} CPUs | {env['platform']}",
        " | ".join([f"aiohttp {env['aiohttp']}", f"msgspec {env['msgspec']}", *peers]),
        f"run took {result['raw']['seconds']:.0f} s; every cell: median [min-max] over the runs",
        "",
        *figure_table(
            f"Sink capacity ({opts['repeats']} blasts of {opts['sink_seconds']:g} s each, from one "
            "asyncio process; the sink's own CPU use shows how close it came to its limit)",
            "blast",
            CAPACITY,
            summary["capacity"],
        ),
        *figure_table(
            f"Scenario 1: one burst, queues big enough to drop nothing ({opts['repeats']} runs "
            "per driver, alternated)",
            "driver",
            SCENARIO1,
            s1,
        ),
        *figure_table(
            "Scenario 1, continued (bytes: request bodies as sent, then with the request line "
            "and headers; responses not counted)",
            "driver",
            SCENARIO1_MORE,
            s1,
        ),
        *figure_table(
            "Ratios of lehnz_async to each driver (computed per round, from the two runs of that "
            "round; naive's run has fewer events, so its peak RSS ratio is not like for like)",
            "driver",
            [(label, key, "{:.2f}") for key, _, _, label in RATIOS],
            summary["ratios"],
        ),
        *figure_table(
            f"Scenario 2: the same {n}-event burst, each library's default queue size "
            f"({other} runs each)",
            "driver (default queue)",
            SCENARIO2,
            {
                f"{d} ({summary['default_configs'][d]['max_queue_size']:,})": f
                for d, f in summary["scenario2"].items()
            },
        ),
        *figure_table(
            "Scaling, lehnz_async (burst: one tight loop into a queue that holds every event; "
            "paced: 1,000-event chunks, yielding between them, default queue of 100,000)",
            "mode, events",
            SCALING,
            {f"{c.split()[0]} {int(c.split()[1]):,}": f for c, f in summary["scaling"].items()},
        ),
        *figure_table(
            f"Single-call latency, µs: {opts['probes']:,} calls per run at most, each after "
            f"~50 µs of work, while a {opts['latency_events']:,}-event burst is delivered "
            f"({other} runs pooled); idle: 1,000 calls per run with nothing to send; floor: "
            "the same probe around a bare deque.append(args)",
            "driver",
            [*LATENCY, ("p99 per run", "p99_per_run_us", "{:.1f}")],
            summary["latency"],
            lambda v, fmt: " ".join(map(fmt.format, v)) if isinstance(v, list) else fmt.format(v),
        ),
        *table(
            "Configuration of each driver (scenario 1; scenario 2 uses the default queue size)",
            ["driver", "configuration"],
            [
                [d, ", ".join(f"{k}={v}" for k, v in c.items())]
                for d, c in summary["configs"].items()
            ],
        ),
    ]
    if "gzip" in result:
        g = result["gzip"]
        lines += table(
            'lehnz_async with compression="gzip" (off by default): a 500-event batch of this '
            "stream, gzip level 1 as the transport sends it; medians of 200 batches, CPU of "
            "one process",
            ["body B", "gzipped B", "smaller by", "CPU µs per batch", "CPU µs per event"],
            [
                [
                    f"{g['body_bytes']:,.0f}",
                    f"{g['gzip_bytes']:,.0f}",
                    f"{g['ratio']:.1f}x",
                    f"{g['cpu_us_per_batch']:.0f}",
                    f"{g['cpu_us_per_event']:.3f}",
                ]
            ],
        )
    return "\n".join(lines).rstrip() + "\n"


# -- entry points -----------------------------------------------------------------------------


def gzip_figures(batches: int = 200, size: int = 500) -> dict[str, float]:
    """What ``compression="gzip"`` costs and saves on this stream: 500-event batches
    encoded as the tracker encodes them, then compressed as its transport does (level 1);
    medians over ``batches`` batches, CPU time of this process."""
    import gzip

    from drivers import make_stream

    from lehnz_async import Tracker

    tracker = Tracker(capture=True)
    body_bytes, gzip_bytes, cpu_us = [], [], []
    for b in range(batches):
        users, names, items, contexts = make_stream(b * size, (b + 1) * size)
        for args in zip(users, names, items, contexts, strict=True):
            tracker.track(args[0], args[1], item_id=args[2], context=args[3])
        body = msgspec.json.encode(list(tracker._events))
        tracker._events.clear()
        started = time.process_time()
        packed = gzip.compress(body, compresslevel=1, mtime=0)
        cpu_us.append((time.process_time() - started) * 1e6)
        body_bytes.append(len(body))
        gzip_bytes.append(len(packed))
    plain, packed_size = statistics.median(body_bytes), statistics.median(gzip_bytes)
    return {
        "batch_events": size,
        "body_bytes": plain,
        "gzip_bytes": packed_size,
        "ratio": plain / packed_size,
        "cpu_us_per_batch": statistics.median(cpu_us),
        "cpu_us_per_event": statistics.median(cpu_us) / size,
    }


def run(
    opts: Options = DEFAULTS, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Run the whole comparison; return the raw results, their summary and the setup."""
    if opts.events < 1 or opts.repeats < 1 or opts.other_repeats < 0:
        raise ValueError("events and repeats must be at least 1, other_repeats at least 0")
    missing = {m for d in opts.drivers if d in PEERS for m in PEERS[d].requires}
    missing = {m for m in missing if importlib.util.find_spec(m) is None}
    if missing:
        raise SystemExit(
            f"not installed: {', '.join(sorted(missing))}; run "
            "`pip install -r benchmarks/requirements.txt`, or pass --no-peers"
        )
    raw = measure(opts, progress)
    environment = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "commit": git_commit(Path(__file__).resolve().parents[1]),
        "lehnz_async": lehnz_async.__version__,
        "aiohttp": aiohttp.__version__,
        "msgspec": msgspec.__version__,
    }
    return {
        "environment": environment,
        "options": opts._asdict(),
        "summary": analyse(raw),
        "gzip": gzip_figures(),
        "raw": raw,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d, add = DEFAULTS, parser.add_argument
    add("--events", type=int, default=d.events, help="events per burst")
    add("--naive-events", type=int, default=d.naive_events, help="events per naive-driver run")
    add("--repeats", type=int, default=d.repeats, help="rounds of scenario 1")
    add("--other-repeats", type=int, default=d.other_repeats, help="rounds of the rest (0: none)")
    add("--drivers", default=",".join(d.drivers), help=f"comma-separated, of {', '.join(DRIVERS)}")
    add("--no-peers", action="store_true", help=f"leave out {', '.join(PEERS)}")
    add("--scaling-sizes", default="10000,100000,1000000", help="event counts of the scaling check")
    add("--latency-events", type=int, default=d.latency_events)
    add("--probes", type=int, default=d.probes, help="timed calls per latency run")
    add("--sink-seconds", type=float, default=d.sink_seconds)
    add("--quick", action="store_true", help="lehnz_async alone, scenario 1 only")
    add("--smoke", action="store_true", help="tiny N, no peers, one round")
    add("--json", action="store_true", help="print everything as JSON")
    args = parser.parse_args(argv)

    drivers = tuple(x for x in args.drivers.split(",") if x)
    if set(drivers) - set(DRIVERS):
        parser.error(f"unknown driver(s): {', '.join(sorted(set(drivers) - set(DRIVERS)))}")
    if args.no_peers:
        drivers = tuple(x for x in drivers if x not in PEERS)
    fields = {k: v for k, v in vars(args).items() if k in Options._fields}
    fields["scaling_sizes"] = tuple(int(x) for x in args.scaling_sizes.split(",") if x)
    opts = Options(**{**fields, "drivers": drivers})
    if args.quick:
        opts = opts._replace(drivers=("lehnz_async",), other_repeats=0)
    if args.smoke:
        opts = SMOKE
    result = run(opts, lambda message: print(message, file=sys.stderr, flush=True))
    print(json.dumps(result) if args.json else format_report(result))


if __name__ == "__main__":
    main()
