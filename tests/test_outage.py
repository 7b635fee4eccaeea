"""Outage mode: on virtual time through the engine's simulation harness, and one short
outage end to end over real HTTP against the reference server."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from lehnz_async import AuthenticationError, RetryPolicy
from lehnz_async.testing import MemorySpool, ReferenceServer

from .conftest import FAST_RETRY, Errors, track_many, user_ids

pytest.importorskip("looptime", reason="virtual time needs looptime 0.9 (Python 3.11+)")

from .sim import Sim, run_steadily, run_virtual, scripted


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


async def produce(sim: Sim, seconds: float, rate: int = 500) -> list[Any]:
    """Track ``rate`` events a second for ``seconds``, in 10 ms steps; the stats each
    second."""
    snapshots = []
    for step in range(int(seconds * 100)):
        sim.track_some(rate // 100, plain=True)
        await asyncio.sleep(0.01)
        if step % 100 == 0:
            snapshots.append(sim.tracker.stats)
    return snapshots


def down(sim: Sim, kind: str, seconds: float) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    sim.transport.down_kind = kind
    sim.transport.down_until = loop.time() + seconds
    return loop.time(), sim.transport.down_until


def requests_between(sim: Sim, start: float, end: float) -> list[tuple[float, float, str, int]]:
    return sorted(entry for entry in sim.transport.log if start <= entry[0] < end)


@pytest.mark.parametrize("kind", ["reset", "5xx", "timeout"])
def test_an_outage_loses_nothing_probes_alone_and_drains_at_once(kind: str) -> None:
    sim = scripted(latency=0.005)
    window: list[float] = []

    async def main() -> None:
        async with sim.tracker:
            await produce(sim, 5)
            window.extend(down(sim, kind, 60.0))
            await produce(sim, 60)
            assert sim.tracker.stats.state == "outage"
            await produce(sim, 5)
            window.append(asyncio.get_running_loop().time())
            await sim.tracker.flush()
            window.append(asyncio.get_running_loop().time())

    run_virtual(main)
    start, back, _, drained = window
    stats = sim.tracker.stats
    sim.check_final()
    assert (stats.delivered, stats.failed, stats.dropped) == (500 * 70, 0, 0)
    assert stats.outages == 1 and stats.state == "healthy"
    # after the grace, at most one request at a time: the probe
    during = requests_between(sim, start + 4.5, back)  # grace, and what was in flight
    assert all(b[0] >= a[1] - 1e-9 for a, b in itertools.pairwise(during)), "overlapping probes"
    assert 60 / 10 <= len(during) <= 60 / 0.5
    # the end is noticed within probe_max_delay, and the backlog goes in seconds
    first_ok = min(e[1] for e in sim.transport.log if e[2] == "ok" and e[0] >= back)
    assert first_ok - back <= 10.0 + 0.1
    assert drained - back <= 10.0 + 5.0


@pytest.mark.parametrize("seed", range(5))
def test_after_an_outage_the_oldest_batch_goes_first(seed: int) -> None:
    """A batch that was backing off when the outage began is parked at once, so it is
    not sent after younger ones when its backoff would have ended."""
    policy = RetryPolicy(max_attempts=50, base_delay=8.0, max_delay=8.0)
    sim = scripted(latency=0.0, retry=policy, outage_grace=0.5, probe_max_delay=1.0)
    sim.tracker._rng.seed(seed)
    window: list[float] = []

    async def main() -> None:
        async with sim.tracker:
            window.extend(down(sim, "reset", 3.0))  # shorter than most backoffs
            await produce(sim, 15, rate=200)

    run_virtual(main)
    _, back = window
    oks = [e for e in sorted(sim.transport.log) if e[2] == "ok" and e[0] >= back - 10.0]
    assert oks and oks[0][3] == 0, oks[:3]  # event 0 was the first to fail
    sim.check_final()


def test_retry_after_spaces_the_probes() -> None:
    sim = scripted(latency=0.0)
    window: list[float] = []

    async def main() -> None:
        async with sim.tracker:
            window.extend(down(sim, "429:7", 120.0))
            await produce(sim, 130, rate=100)

    run_virtual(main)
    start, back = window
    probes = [e for e in requests_between(sim, start + 10.0, back) if e[2] == "429:7"]
    assert len(probes) >= 5
    assert all(b[0] - a[1] >= 7.0 - 1e-6 for a, b in itertools.pairwise(probes))
    sim.check_final()
    assert sim.tracker.stats.delivered == 13_000


def test_an_outage_longer_than_the_budget_drops_by_reason_and_counts_everything() -> None:
    sim = scripted(latency=0.0, max_buffer_bytes=400_000, max_batch_size=50)
    peaks: list[int] = []

    async def main() -> None:
        async with sim.tracker:
            down(sim, "reset", 100.0)
            peaks.extend(s.backlog_bytes for s in await produce(sim, 100))
            await produce(sim, 5)

    run_virtual(main)
    stats = sim.tracker.stats
    sim.check_final()
    assert stats.dropped > 0 and set(stats.drops) == {"max_buffer_bytes"}
    assert stats.delivered + stats.dropped == 500 * 105
    assert max(peaks) <= 400_000


def test_an_outage_spills_to_the_spool_within_the_memory_budget_and_replays_it() -> None:
    spool = MemorySpool()
    sim = scripted(latency=0.0, max_buffer_bytes=800_000, max_batch_size=50, spool=spool)
    peaks: list[int] = []
    spilled: list[int] = []

    async def main() -> None:
        async with sim.tracker:
            down(sim, "5xx", 100.0)
            peaks.extend(s.backlog_bytes for s in await produce(sim, 100))
            spilled.append(len(spool.rows))
            await produce(sim, 5)
            await sim.tracker.flush()

    run_virtual(main)
    stats = sim.tracker.stats
    sim.check_final()
    assert spilled[0] > 0, "nothing was spilled"
    assert max(peaks) <= 800_000
    assert (stats.delivered, stats.dropped, stats.spooled) == (500 * 105, 0, 0)
    assert spool.rows == []  # replayed and deleted, each once (check_final: none twice)


def test_max_event_age_drops_what_waited_too_long() -> None:
    sim = scripted(latency=0.0, max_event_age=30.0)

    async def main() -> None:
        async with sim.tracker:
            down(sim, "reset", 60.0)
            await produce(sim, 65, rate=100)

    run_virtual(main)
    stats = sim.tracker.stats
    sim.check_final()
    assert stats.drops.get("max_event_age", 0) > 0
    assert stats.delivered + stats.dropped == 6_500


def test_a_413_teaches_the_body_limit() -> None:
    sim = scripted(latency=0.0, max_batch_size=100, flush_interval=0.1)
    sim.server.body_limit = 3_000
    run_steadily(sim, 20, 100, 1.0)
    sim.check_final()
    assert sim.tracker.stats.delivered == 2_000
    statuses = sim.transport.statuses
    assert 413 in statuses[:5]  # the first batch is over the limit
    # after the first batches taught the limit, one request per batch: no more 413s
    later = statuses[len(statuses) // 4 :]
    assert later and 413 not in later, statuses
    assert sim.tracker._destination.body_limit is not None
    assert sim.tracker.stats.requests <= sim.tracker.stats.batches + 12, statuses


def test_a_refused_key_is_never_waited_out() -> None:
    sim = scripted(latency=0.0, on_error=Errors())
    sim.transport.script = []
    errors = sim.options["on_error"]

    async def main() -> None:
        sim.server.handle = lambda body, key: (401, b'{"error": "Missing or invalid X-API-KEY"}')  # type: ignore[method-assign]
        async with sim.tracker:
            sim.track_some(10, plain=True)

    run_virtual(main)
    assert [type(e) for e in errors] == [AuthenticationError]
    assert sim.tracker.stats.outages == 0


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["refuse", "502"])
async def test_a_short_outage_end_to_end_over_http(
    server: ReferenceServer, errors: Errors, kind: str
) -> None:
    from lehnz_async import Tracker

    tracker = Tracker(
        server.api_key,
        endpoint=server.url,
        on_error=errors,
        retry=FAST_RETRY,
        outage_grace=0.2,
        probe_max_delay=0.5,
        flush_interval=0.05,
        max_batch_size=20,
    )
    async with tracker:
        track_many(tracker, 100)
        await tracker.flush()
        await server.outage(kind, 2.0)  # type: ignore[arg-type]
        for i in range(100, 300):
            tracker.track(f"usr_{i}", "view")
            await asyncio.sleep(0.005)
        # (on a loaded machine the 2 s outage may be over before the 200 are tracked)
        assert tracker.stats.state == "outage" or tracker.stats.outages == 1
        await server.wait_for(lambda: not server.is_down, timeout=10)
        await tracker.flush()
    assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(300))
    assert errors == [] and tracker.stats.outages == 1
    assert tracker.stats.delivered == 300 and tracker.stats.retries >= 1
    _ = RetryPolicy


def test_the_spill_stays_within_max_spool_bytes_and_the_rest_is_dropped_by_reason() -> None:
    spool = MemorySpool()
    sim = scripted(
        latency=0.0,
        max_buffer_bytes=800_000,
        max_batch_size=50,
        spool=spool,
        max_spool_bytes=1_000_000,
    )
    sizes: list[int] = []

    async def main() -> None:
        async with sim.tracker:
            down(sim, "reset", 200.0)
            for _ in range(200):
                await produce(sim, 1)
                sizes.append(sum(len(row.body) for row in spool.rows))
            await produce(sim, 5)

    run_virtual(main)
    stats = sim.tracker.stats
    sim.check_final()
    assert max(sizes) > 900_000  # it did fill the spool
    assert max(sizes) <= 1_000_000
    assert set(stats.drops) == {"max_buffer_bytes"}  # what neither could hold, counted
    assert stats.delivered + stats.dropped == 500 * 205 and spool.rows == []


@pytest.mark.parametrize("max_event_age", [None, 30.0])
def test_age_marks_stay_bounded_over_a_long_run(max_event_age: float | None) -> None:
    sim = scripted(latency=0.0, max_event_age=max_event_age)
    marks: list[int] = []

    async def main() -> None:
        async with sim.tracker:
            for _ in range(600):  # ten minutes of ticks
                sim.track_some(1, plain=True)
                await asyncio.sleep(1.0)
            flusher = sim.tracker._binding.flusher
            assert flusher is not None
            marks.append(len(flusher._marks))

    run_virtual(main)
    sim.check_final()
    assert marks[0] <= (0 if max_event_age is None else 32)
