"""Where lehnz_async's delivery time goes: cProfile of the flusher, per batch.

    python benchmarks/profile_flusher.py [--events 100000] [--top 25] [--driver lehnz_async]

A sink (benchmarks/sink.py) runs in its own process. In this process, a driver of
benchmarks/drivers.py (lehnz_async by default, or the ceiling for comparison) is warmed
up, then a burst of N events is tracked (not profiled) and the driver's flush, which
sends them all, is run once without and once with cProfile (on a second, identical
burst). It prints the flush's wall time per batch of 500 events both ways, then the
functions with the most own time (tottime) and the most cumulative time, in µs per batch.

cProfile adds a cost to every Python call, so the profiled figures overstate what is
pure Python against what runs in C (msgspec, the socket calls); the unprofiled wall
time per batch is the true total.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import time
from typing import Any

from drivers import DRIVER_TYPES, chunk_bounds, running_sink


async def _profile(driver_name: str, events: int, top: int) -> str:
    with running_sink() as sink:
        driver = DRIVER_TYPES[driver_name]()
        await driver.start(sink, max(events, 100_000))
        driver.burst([driver.prepare(0, 1000)])
        await driver.flush()
        chunks = [driver.prepare(lo, hi) for lo, hi in chunk_bounds(events, 10)]
        batches = -(-events // 500)
        sink.reset()

        driver.burst(chunks)
        start = time.perf_counter()
        await driver.flush()
        plain = time.perf_counter() - start

        driver.burst(chunks)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        await driver.flush()
        profiler.disable()
        profiled = time.perf_counter() - start
        counts = sink.counts()
        await driver.close()

    out = io.StringIO()
    print(
        f"{driver_name}: flush of {events:,} events = {batches} batches of 500, twice "
        f"(the sink counted {counts['events']:,} events in {counts['requests']:,} requests)",
        file=out,
    )
    print(
        f"wall time per batch: {plain / batches * 1e6:,.0f} µs without the profiler "
        f"({events / plain:,.0f} events/s), {profiled / batches * 1e6:,.0f} µs with it",
        file=out,
    )
    stats = pstats.Stats(profiler)
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        print(f"\ntop {top} by {title}, µs per batch (profiled):", file=out)
        print(f"{'own':>8} {'cum':>8} {'calls/batch':>11}  function", file=out)
        rows: list[tuple[float, float, float, str]] = []
        raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
        for (path, line, name), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
            where = f"{path.split('site-packages/')[-1]}:{line}({name})"
            rows.append((tottime, cumtime, ncalls, where))
        rows.sort(key=lambda r: r[0] if key == "tottime" else r[1], reverse=True)
        for tottime, cumtime, ncalls, where in rows[:top]:
            print(
                f"{tottime / batches * 1e6:8.1f} {cumtime / batches * 1e6:8.1f} "
                f"{ncalls / batches:11.1f}  {where}",
                file=out,
            )
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--driver", choices=("lehnz_async", "ceiling"), default="lehnz_async")
    args = parser.parse_args(argv)
    print(asyncio.run(_profile(args.driver, args.events, args.top)))


if __name__ == "__main__":
    main()
