"""lehnz_async against Segment, PostHog, a naive per-event POST and the practical ceiling.

    python benchmarks/compare.py                # the full comparison (a few minutes)
    python benchmarks/compare.py --json > result.json
    python benchmarks/compare.py --smoke        # seconds: tiny N, no peers (what CI runs)

Everything runs on loopback, in one run: a sink (benchmarks/sink.py) in its own process,
its capacity measured, then each measurement in a driver process of its own
(benchmarks/drivers.py), the drivers taking turns in a rotated order in every round:

1. Scenario 1: a burst of N events (default 100,000; the naive driver fewer, see
   --naive-events), queues large enough to drop nothing: track() µs per call, end-to-end
   events/s, delivered, dropped, peak RSS, bytes on the wire per event, and the ratios of
   lehnz_async to each other driver, round by round.
2. Scenario 2: the same burst with each library's *default* queue size.
3. Scaling (lehnz_async): 10k, 100k and 1M events, as one burst into a queue that holds
   them all, and paced (a producer that yields to the loop, default queue).
4. Latency: single track() calls timed one by one while a burst is being delivered.

The peers (segment-analytics-python, posthog) come from benchmarks/requirements.txt;
``--no-peers`` leaves them out. See benchmarks/README.md for what every figure means.
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
from bench_tracker import Sink, environment, running_sink
from drivers import DRIVERS, LEHNZ_KEY, LEHNZ_PATH, PEERS

DRIVERS_SCRIPT = Path(__file__).with_name("drivers.py")
#: Drivers of scenario 2 and of the latency check (they are the ones with a queue limit).
QUEUED_DRIVERS = ("lehnz_async", "segment", "posthog")
#: Seconds one driver process may take before it is killed (and the benchmark fails).
DRIVER_TIMEOUT = 600.0
#: Sink capacity blasts: (label, events per POST, POSTs in flight).
BLASTS = (("4 x 500-event arrays", 500, 4), ("64 x 1-event POSTs", 1, 64))
#: Peer packages, by driver name.
PEER_MODULES = {"segment": "segment.analytics", "posthog": "posthog"}

Progress = Callable[[str], None]


class Options(NamedTuple):
    """What to run (the command-line options; see benchmarks/README.md)."""

    #: Events per burst of scenarios 1 and 2.
    events: int = 100_000
    #: Events per run of the naive driver (it delivers a few thousand per second).
    naive_events: int = 20_000
    #: Rounds of scenario 1.
    repeats: int = 3
    #: Rounds of scenario 2, of the scaling check and of the latency check.
    other_repeats: int = 3
    drivers: tuple[str, ...] = DRIVERS
    #: Event counts of the scaling check (each run as a burst and paced).
    scaling_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    #: The burst being delivered while single calls are timed, and the most calls timed.
    latency_events: int = 20_000
    probes: int = 5_000
    #: Seconds of each sink capacity blast.
    sink_seconds: float = 1.0
    #: Events each driver sends and flushes before it is measured.
    warmup: int = 1_000


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


# -- running things -----------------------------------------------------------------------


async def run_driver(
    sink: Sink,
    driver: str,
    events: int,
    *,
    mode: str = "burst",
    queue_size: int | None = None,
    warmup: int = 1000,
    probes: int = 0,
) -> dict[str, Any]:
    """Run one driver process; return its result with the sink's final counters added."""
    args = [
        sys.executable,
        str(DRIVERS_SCRIPT),
        driver,
        "--sink",
        sink.base_url,
        "--events",
        str(events),
        "--mode",
        mode,
        "--warmup",
        str(warmup),
    ]
    if queue_size is not None:
        args += ["--queue-size", str(queue_size)]
    if probes:
        args += ["--probes", str(probes)]
    # The peers' own environment variables could change their wire protocol.
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTHOG_")}
    with tempfile.TemporaryFile() as stderr:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), DRIVER_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"{driver} ({mode}, {events:,} events) timed out") from None
        if proc.returncode != 0:
            stderr.seek(0)
            tail = stderr.read()[-3000:].decode("utf-8", "replace")
            raise RuntimeError(f"{driver} ({mode}) exited with {proc.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(out)
    # Read after the process has gone: whatever arrived after its flush returned counts.
    result["sink_final"] = {k: v for k, v in (await sink.counts()).items() if k != "cpu_seconds"}
    return result


async def blast(sink: Sink, batch: int, concurrency: int, seconds: float) -> dict[str, float]:
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
    url = sink.base_url + LEHNZ_PATH
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post() -> None:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 202:
                    raise RuntimeError(f"the sink answered {resp.status}")

        await asyncio.gather(*(post() for _ in range(concurrency)))  # open the connections
        cpu = await sink.reset()

        async def blaster(deadline: float) -> None:
            while time.perf_counter() < deadline:
                await post()

        start = time.perf_counter()
        await asyncio.gather(*(blaster(start + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    counts = await sink.counts()
    sink_cpu = counts["cpu_seconds"] - cpu
    return {
        "events_per_s": counts["events"] / elapsed,
        "requests_per_s": counts["requests"] / elapsed,
        "sink_busy_percent": sink_cpu / elapsed * 100,
        "events_per_sink_cpu_s": counts["events"] / sink_cpu,
    }


def rotated(items: Sequence[str], r: int) -> list[str]:
    """``items`` starting at position ``r`` (mod its length): round r's order."""
    k = r % len(items)
    return [*items[k:], *items[:k]]


async def _run(opts: Options, progress: Progress) -> dict[str, Any]:
    results: dict[str, Any] = {
        "capacity": {label: [] for label, _, _ in BLASTS},
        "scenario1": {d: [] for d in opts.drivers},
        "scenario2": {d: [] for d in opts.drivers if d in QUEUED_DRIVERS},
        "scaling": {},
        "latency": {d: [] for d in opts.drivers if d in QUEUED_DRIVERS},
    }
    started = time.perf_counter()

    def say(message: str) -> None:
        progress(f"[{time.perf_counter() - started:6.1f} s] {message}")

    async with running_sink() as sink:
        for r in range(opts.repeats):
            for label, batch, concurrency in BLASTS:
                cap = await blast(sink, batch, concurrency, opts.sink_seconds)
                results["capacity"][label].append(cap)
                say(f"round {r + 1}: sink, {label}: {cap['events_per_s']:,.0f} events/s")
            for driver in rotated(opts.drivers, r):
                n = opts.naive_events if driver == "naive" else opts.events
                res = await run_driver(
                    sink, driver, n, queue_size=max(n, 100_000), warmup=opts.warmup
                )
                results["scenario1"][driver].append(res)
                say(f"round {r + 1}: scenario 1, {driver}: {_brief(res)}")

        queued = [d for d in opts.drivers if d in QUEUED_DRIVERS]
        for r in range(opts.other_repeats):
            for driver in rotated(queued, r):
                res = await run_driver(sink, driver, opts.events, warmup=opts.warmup)
                results["scenario2"][driver].append(res)
                say(f"round {r + 1}: scenario 2 (default queue), {driver}: {_brief(res)}")

        if "lehnz_async" in opts.drivers:
            cases = [(mode, n) for n in opts.scaling_sizes for mode in ("burst", "paced")]
            for r in range(opts.other_repeats):
                for k in range(len(cases)):
                    mode, n = cases[(k + r) % len(cases)]
                    res = await run_driver(
                        sink,
                        "lehnz_async",
                        n,
                        mode=mode,
                        queue_size=max(n, 100_000) if mode == "burst" else None,
                        warmup=opts.warmup,
                    )
                    results["scaling"].setdefault(f"{mode} {n}", []).append(res)
                    say(f"round {r + 1}: scaling, {mode} {n:,}: {_brief(res)}")

        for r in range(opts.other_repeats):
            for driver in rotated(queued, r):
                res = await run_driver(
                    sink,
                    driver,
                    opts.latency_events,
                    mode="latency",
                    queue_size=max(opts.latency_events, 100_000),
                    warmup=opts.warmup,
                    probes=opts.probes,
                )
                results["latency"][driver].append(res)
                lat = sorted(res["latency_ns"])
                say(
                    f"round {r + 1}: latency, {driver}: {len(lat):,} calls, "
                    f"p50 {_pct(lat, 50) / 1000:.2f} µs, p99 {_pct(lat, 99) / 1000:.2f} µs"
                )
    results["seconds"] = time.perf_counter() - started
    return results


def _brief(res: dict[str, Any]) -> str:
    n = res["events"]
    return (
        f"track() {res['track_seconds'] / n * 1e6:.3f} µs, "
        f"{n / res['end_to_end_seconds']:,.0f} events/s, "
        f"delivered {res['sink_final']['events']:,}/{n:,}"
    )


# -- figures ---------------------------------------------------------------------------------


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
    """The figures of one burst run."""
    n = res["events"]
    final = res["sink_final"]
    delivered = final["events"]
    failed = res["library_failed"] or 0
    dropped = res["library_dropped"]
    if dropped is None:  # the peers count no drops we can read: what never arrived
        dropped = n - delivered - failed
    e2e = res["end_to_end_seconds"]
    chunks = res["chunk_seconds"]
    per_chunk = n / len(chunks) if res["mode"] == "burst" else 1000
    figures = {
        "track_us": res["track_seconds"] / n * 1e6,
        "events_per_s": n / e2e,
        "drain_events_per_s": n / max(e2e - res["track_seconds"], 1e-9),
        "delivered": delivered,
        "delivered_ratio": delivered / n,
        "dropped": dropped,
        "failed": failed,
        "peak_rss_mb": res["rss_peak_bytes"] / 2**20,
        "rss_growth_mb": (res["rss_peak_bytes"] - res["rss_baseline_bytes"]) / 2**20,
        "body_bytes_per_event": final["bytes"] / delivered if delivered else float("nan"),
        "wire_bytes_per_event": (final["bytes"] + final["header_bytes"]) / delivered
        if delivered
        else float("nan"),
        "events_per_request": delivered / final["requests"] if final["requests"] else 0.0,
        "sink_busy_percent": res["sink_cpu_seconds"] / e2e * 100,
        "first_chunk_us": chunks[0] / per_chunk * 1e6,
        "last_chunk_us": chunks[-1] / per_chunk * 1e6,
        "late_events": delivered - res["sink_at_flush"]["events"],
        "rejected": final["rejected"],
    }
    if res.get("empty_loop_seconds") is not None:
        figures["empty_loop_us"] = res["empty_loop_seconds"] / n * 1e6
        figures["track_net_us"] = figures["track_us"] - figures["empty_loop_us"]
    return figures


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    figures = [run_figures(res) for res in runs]
    return {key: summarize(f[key] for f in figures) for key in figures[0]}


#: Ratios of lehnz_async to another driver: (key, figure, how, label).
RATIOS = (
    ("track_cost", "track_us", "other/lehnz", "track() cost: other ÷ lehnz (x cheaper)"),
    ("throughput", "events_per_s", "lehnz/other", "end-to-end: lehnz ÷ other (x faster)"),
    ("peak_rss", "peak_rss_mb", "lehnz/other", "peak RSS: lehnz ÷ other"),
    ("wire_bytes", "wire_bytes_per_event", "lehnz/other", "wire bytes/event: lehnz ÷ other"),
)


def ratios(
    lehnz_runs: list[dict[str, Any]], other_runs: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Ratios computed round by round (the two ran in the same round), then summarized."""
    out: dict[str, dict[str, float]] = {}
    pairs = [(run_figures(a), run_figures(b)) for a, b in zip(lehnz_runs, other_runs, strict=False)]
    for key, figure, how, _ in RATIOS:
        values = [
            (b[figure] / a[figure]) if how == "other/lehnz" else (a[figure] / b[figure])
            for a, b in pairs
        ]
        out[key] = summarize(values)
    return out


def latency_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Percentiles of the pooled single-call samples of all runs, in µs."""
    busy = sorted(v for res in runs for v in res["latency_ns"])
    idle = sorted(v for res in runs for v in res["idle_latency_ns"])
    floor = sorted(v for res in runs for v in res["floor_latency_ns"])
    timer = sorted(v for res in runs for v in res["timer_ns"])
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
        "refills": sum(res.get("latency_refills", 0) for res in runs),
    }


def analyse(raw: dict[str, Any]) -> dict[str, Any]:
    """Every summary the report prints, from the raw results."""
    s1 = raw["scenario1"]
    summary: dict[str, Any] = {
        "capacity": {
            label: {key: summarize(run[key] for run in runs) for key in runs[0]}
            for label, runs in raw["capacity"].items()
        },
        "scenario1": {d: summarize_runs(runs) for d, runs in s1.items()},
        "scenario2": {d: summarize_runs(runs) for d, runs in raw["scenario2"].items() if runs},
        "scaling": {case: summarize_runs(runs) for case, runs in raw["scaling"].items()},
        "latency": {d: latency_figures(runs) for d, runs in raw["latency"].items() if runs},
        "configs": {d: runs[0]["config"] for d, runs in s1.items()},
        "default_configs": {d: runs[0]["config"] for d, runs in raw["scenario2"].items() if runs},
    }
    if "lehnz_async" in s1:
        summary["ratios"] = {
            d: ratios(s1["lehnz_async"], runs) for d, runs in s1.items() if d != "lehnz_async"
        }
    summary["targets"] = targets(summary)
    return summary


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure (median) and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, met: bool | None) -> None:
        out.append({"target": name, "value": value, "goal": goal, "met": met})

    s1, r = summary["scenario1"], summary.get("ratios", {})
    if "lehnz_async" not in s1:
        return out
    track = s1["lehnz_async"]["track_us"]["median"]
    add("track() µs per call, loop included", track, "≤ 0.8", track <= 0.8)
    if "segment" in r:
        v = r["segment"]["track_cost"]["median"]
        add("track() x cheaper than Segment", v, "≥ 30", v >= 30)
    if "ceiling" in r:
        v = r["ceiling"]["throughput"]["median"]
        add("end-to-end ÷ ceiling", v, "≥ 0.85", v >= 0.85)
    if "segment" in r:
        v = r["segment"]["throughput"]["median"]
        add("end-to-end x Segment", v, "≥ 30", v >= 30)
    if "ceiling" in r:
        v = r["ceiling"]["peak_rss"]["median"]
        add("peak RSS ÷ ceiling's", v, "≤ 1.0", v <= 1.0)
    lat = summary["latency"].get("lehnz_async")
    if lat:
        add("p99 of single track() while flushing, µs", lat["p99_us"], "≤ 5", lat["p99_us"] <= 5)
    s2 = summary["scenario2"].get("lehnz_async")
    if s2:
        v = s2["dropped"]["max"]
        add("dropped at defaults, 100k burst (max of runs)", v, "= 0", v == 0)
    return out


# -- the report ------------------------------------------------------------------------------


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
    lines = [title]
    lines.append(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    )
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return [*lines, ""]


def format_report(result: dict[str, Any]) -> str:
    env, opts, summary = result["environment"], result["options"], result["summary"]
    lines = [
        f"lehnz_async {env['lehnz_async']} (commit {env.get('commit')}) vs peers | "
        f"{env['implementation']} {env['python']} | "
        f"{env['cpu_count']} CPUs | {env['platform']}",
        " | ".join(
            [
                f"aiohttp {env['aiohttp']}",
                f"msgspec {env['msgspec']}",
                *(f"{d} {c['version']}" for d, c in summary["configs"].items() if d in PEERS),
            ]
        ),
        f"run took {result['raw']['seconds']:.0f} s; every cell: median [min-max] over the runs",
        "",
    ]
    caps = summary["capacity"]
    lines += table(
        f"Sink capacity ({opts['repeats']} blasts of {opts['sink_seconds']:g} s each, from one "
        "asyncio process; the sink's own CPU use shows how close it came to its limit)",
        ["blast", "events/s", "requests/s", "sink CPU %", "events per sink CPU s"],
        [
            [
                label,
                cell(c["events_per_s"], "k"),
                cell(c["requests_per_s"], "k"),
                cell(c["sink_busy_percent"], "{:.0f}"),
                cell(c["events_per_sink_cpu_s"], "k"),
            ]
            for label, c in caps.items()
        ],
    )
    s1 = summary["scenario1"]
    n_of = {d: (opts["naive_events"] if d == "naive" else opts["events"]) for d in s1}
    lines += table(
        f"Scenario 1: one burst, queues big enough to drop nothing ({opts['repeats']} runs per "
        "driver, alternated)",
        [
            "driver",
            "events",
            "track() µs/call",
            "empty loop µs",
            "end-to-end events/s",
            "after-burst events/s",
            "sink CPU %",
        ],
        [
            [
                d,
                f"{n_of[d]:,}",
                cell(f["track_us"], "{:.3f}"),
                cell(f["empty_loop_us"], "{:.3f}"),
                cell(f["events_per_s"], "k"),
                cell(f["drain_events_per_s"], "k"),
                cell(f["sink_busy_percent"], "{:.0f}"),
            ]
            for d, f in s1.items()
        ],
    )
    lines += table(
        "Scenario 1, continued (bytes: request bodies as sent, then with the request line "
        "and headers; responses not counted)",
        [
            "driver",
            "delivered/sent",
            "dropped",
            "failed",
            "peak RSS MB",
            "RSS growth MB",
            "body B/event",
            "wire B/event",
            "events/request",
        ],
        [
            [
                d,
                cell(f["delivered_ratio"], "{:.4f}"),
                cell(f["dropped"], "{:,.0f}"),
                cell(f["failed"], "{:,.0f}"),
                cell(f["peak_rss_mb"], "{:.1f}"),
                cell(f["rss_growth_mb"], "{:.1f}"),
                cell(f["body_bytes_per_event"], "{:.1f}"),
                cell(f["wire_bytes_per_event"], "{:.1f}"),
                cell(f["events_per_request"], "{:.0f}"),
            ]
            for d, f in s1.items()
        ],
    )
    if summary.get("ratios"):
        lines += table(
            "Ratios of lehnz_async to each driver (computed per round, from the two runs of "
            "that round; naive's run has fewer events, so its peak RSS ratio is not like for "
            "like)",
            ["driver", *(label for _, _, _, label in RATIOS)],
            [
                [d, *(cell(r[key], "{:.2f}") for key, _, _, _ in RATIOS)]
                for d, r in summary["ratios"].items()
            ],
        )
    s2 = summary["scenario2"]
    if s2:
        lines += table(
            f"Scenario 2: the same {opts['events']:,}-event burst, each library's default queue "
            f"size ({opts['other_repeats']} runs each)",
            [
                "driver",
                "default queue",
                "delivered",
                "dropped",
                "dropped %",
                "failed",
                "track() µs/call",
                "end-to-end events/s",
            ],
            [
                [
                    d,
                    f"{summary['default_configs'][d].get('max_queue_size', '?'):,}",
                    cell(f["delivered"], "{:,.0f}"),
                    cell(f["dropped"], "{:,.0f}"),
                    cell({k: v / opts["events"] * 100 for k, v in f["dropped"].items()}, "{:.1f}"),
                    cell(f["failed"], "{:,.0f}"),
                    cell(f["track_us"], "{:.3f}"),
                    cell(f["events_per_s"], "k"),
                ]
                for d, f in s2.items()
            ],
        )
    if summary["scaling"]:
        rows = []
        for case, f in sorted(
            summary["scaling"].items(), key=lambda kv: (kv[0].split()[0], int(kv[0].split()[1]))
        ):
            mode, n = case.split()
            rows.append(
                [
                    f"{mode} {int(n):,}",
                    cell(f["track_us"], "{:.3f}"),
                    cell(f["first_chunk_us"], "{:.3f}"),
                    cell(f["last_chunk_us"], "{:.3f}"),
                    cell(f["events_per_s"], "k"),
                    cell(f["peak_rss_mb"], "{:.0f}"),
                    cell(f["rss_growth_mb"], "{:.0f}"),
                    cell(f["dropped"], "{:,.0f}"),
                    cell(f["delivered_ratio"], "{:.4f}"),
                ]
            )
        lines += table(
            "Scaling, lehnz_async (burst: one tight loop into a queue that holds every event; "
            "paced: 1,000-event chunks, yielding between them, default queue of 100,000)",
            [
                "mode, events",
                "track() µs/call",
                "first 10% µs",
                "last 10% µs",
                "end-to-end events/s",
                "peak RSS MB",
                "RSS growth MB",
                "dropped",
                "delivered/sent",
            ],
            rows,
        )
    if summary["latency"]:
        lines += table(
            f"Single-call latency, µs: {opts['probes']:,} calls per run at most, each after "
            f"~50 µs of work, while a {opts['latency_events']:,}-event burst is delivered "
            f"({opts['other_repeats']} runs pooled); idle: 1,000 calls per run with nothing "
            "to send; floor: the same probe around a bare deque.append(args)",
            [
                "driver",
                "calls",
                "p50",
                "p99",
                "p99.9",
                "max",
                "p99 per run",
                "idle p50",
                "idle p99",
                "floor p50",
                "floor p99",
                "timer p50",
            ],
            [
                [
                    d,
                    f"{f['calls']:,}",
                    f"{f['p50_us']:.2f}",
                    f"{f['p99_us']:.2f}",
                    f"{f['p999_us']:.2f}",
                    f"{f['max_us']:.0f}",
                    " ".join(f"{v:.1f}" for v in f["p99_per_run_us"]),
                    f"{f['idle_p50_us']:.2f}",
                    f"{f['idle_p99_us']:.2f}",
                    f"{f['floor_p50_us']:.2f}",
                    f"{f['floor_p99_us']:.2f}",
                    f"{f['timer_p50_us']:.2f}",
                ]
                for d, f in summary["latency"].items()
            ],
        )
    lines += table(
        "Configuration of each driver (scenario 1; scenario 2 uses the default queue size)",
        ["driver", "configuration"],
        [[d, ", ".join(f"{k}={v}" for k, v in c.items())] for d, c in summary["configs"].items()],
    )
    if summary["targets"]:
        lines += table(
            "Targets (medians)",
            ["target", "measured", "goal", "met"],
            [
                [t["target"], f"{t['value']:,.3f}", t["goal"], "yes" if t["met"] else "NO"]
                for t in summary["targets"]
            ],
        )
    return "\n".join(lines).rstrip() + "\n"


# -- entry points ----------------------------------------------------------------------------


def _no_progress(message: str) -> None:
    pass


def git_commit() -> str | None:
    """The repository's commit, with "+dirty" if lehnz_async/ has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]

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


def missing_peers(drivers: Iterable[str]) -> list[str]:
    return [
        d
        for d in drivers
        if d in PEER_MODULES and importlib.util.find_spec(PEER_MODULES[d]) is None
    ]


def run(opts: Options = DEFAULTS, progress: Progress = _no_progress) -> dict[str, Any]:
    """Run the whole comparison; return the raw results, their summary and the setup."""
    if opts.events < 1 or opts.repeats < 1 or opts.other_repeats < 1:
        raise ValueError("events and repeats must be at least 1")
    missing = missing_peers(opts.drivers)
    if missing:
        raise SystemExit(
            f"not installed: {', '.join(PEER_MODULES[d] for d in missing)}; run "
            "`pip install -r benchmarks/requirements.txt`, or pass --no-peers"
        )
    raw = asyncio.run(_run(opts, progress))
    return {
        "environment": {**environment(), "machine": platform.machine(), "commit": git_commit()},
        "options": opts._asdict(),
        "summary": analyse(raw),
        "raw": raw,
    }


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = DEFAULTS
    parser.add_argument("--events", type=int, default=d.events, help="events per burst")
    parser.add_argument(
        "--naive-events", type=int, default=d.naive_events, help="events per naive-driver run"
    )
    parser.add_argument("--repeats", type=int, default=d.repeats, help="rounds of scenario 1")
    parser.add_argument(
        "--other-repeats",
        type=int,
        default=d.other_repeats,
        help="rounds of scenario 2, the scaling and the latency checks",
    )
    parser.add_argument(
        "--drivers", default=",".join(d.drivers), help=f"comma-separated, of {', '.join(DRIVERS)}"
    )
    parser.add_argument("--no-peers", action="store_true", help="leave out segment and posthog")
    parser.add_argument(
        "--scaling-sizes",
        type=_sizes,
        default=d.scaling_sizes,
        help="comma-separated event counts of the scaling check",
    )
    parser.add_argument("--latency-events", type=int, default=d.latency_events)
    parser.add_argument("--probes", type=int, default=d.probes, help="timed calls per latency run")
    parser.add_argument("--sink-seconds", type=float, default=d.sink_seconds)
    parser.add_argument("--smoke", action="store_true", help="tiny N, no peers, one round")
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    args = parser.parse_args(argv)

    if args.smoke:
        opts = SMOKE
    else:
        drivers = tuple(x for x in args.drivers.split(",") if x)
        unknown = set(drivers) - set(DRIVERS)
        if unknown:
            parser.error(f"unknown driver(s): {', '.join(sorted(unknown))}")
        if args.no_peers:
            drivers = tuple(x for x in drivers if x not in PEERS)
        opts = Options(
            events=args.events,
            naive_events=args.naive_events,
            repeats=args.repeats,
            other_repeats=args.other_repeats,
            drivers=drivers,
            scaling_sizes=args.scaling_sizes,
            latency_events=args.latency_events,
            probes=args.probes,
            sink_seconds=args.sink_seconds,
        )

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = run(opts, progress)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result))


if __name__ == "__main__":
    main()
