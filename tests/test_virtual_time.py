"""The engine's timing logic on virtual time (looptime): Retry-After, backoff, the retry
time budget, flush_interval, the close deadline, and a 50,000-event soak under faults.
The same engine runs over real HTTP in test_delivery.py and test_engine.py."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator

import pytest

from lehnz_async import RetriesExhaustedError, RetryPolicy, ShutdownError
from lehnz_async.testing import MemorySpool

pytest.importorskip("looptime", reason="virtual time needs looptime 0.9 (Python 3.11+)")

from .sim import run_virtual, scripted


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def test_retry_after_pauses_every_slot() -> None:
    sim = scripted(max_batch_size=10, max_concurrent_requests=4)
    sim.transport.script = ["429:2"]

    async def main() -> None:
        async with sim.tracker:
            sim.track_some(plain=True, n=200)

    run_virtual(main)
    log = sim.transport.log
    (limited,) = [entry for entry in log if entry[2] == "429:2"]
    answered = limited[1]
    started_during_pause = [e for e in log if answered < e[0] < answered + 2.0 - 1e-6]
    assert started_during_pause == []
    assert any(e[0] >= answered + 2.0 for e in log)
    sim.check_final()
    assert sim.tracker.stats.delivered == 200


def test_backoff_waits_within_the_policy_ceilings() -> None:
    policy = RetryPolicy(max_attempts=8, base_delay=0.4, max_delay=1.0)
    sim = scripted(retry=policy, latency=0.0)
    sim.transport.script = ["5xx"] * 5

    async def main() -> None:
        async with sim.tracker:
            sim.track_some(plain=True, n=1)

    run_virtual(main)
    log = sim.transport.log
    assert len(log) == 6 and log[-1][2] == "ok"
    gaps = [after[0] - before[1] for before, after in itertools.pairwise(log)]
    ceilings = [min(1.0, 0.4 * 2**n) for n in range(5)]
    assert all(0 <= gap <= top + 1e-6 for gap, top in zip(gaps, ceilings, strict=True)), gaps
    assert sum(gaps) > 0  # jittered, not zero
    sim.check_final()


def test_a_batch_gives_up_when_its_time_budget_runs_out() -> None:
    policy = RetryPolicy(max_attempts=1000, max_time=5.0, base_delay=1.0, max_delay=1.0)
    sim = scripted(retry=policy, latency=0.0, outage_grace=None)
    sim.transport.faults = {"5xx": 1.0}

    async def main() -> None:
        async with sim.tracker:
            sim.track_some(plain=True, n=3)

    run_virtual(main)
    log = sim.transport.log
    assert log[-1][0] - log[0][0] <= 5.0
    (error,) = sim.errors
    assert isinstance(error, RetriesExhaustedError) and len(error.events) == 3
    sim.check_final()


def test_a_partial_batch_waits_for_the_flush_interval_and_a_full_one_does_not() -> None:
    sim = scripted(max_batch_size=100, flush_interval=5.0, latency=0.0)
    starts: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with sim.tracker:
            t0 = loop.time()
            sim.track_some(plain=True, n=3)
            await asyncio.sleep(4.9)
            assert sim.transport.log == []
            await asyncio.sleep(0.2)
            starts.append(sim.transport.log[0][0] - t0)
            t1 = loop.time()
            sim.track_some(plain=True, n=100)
            await asyncio.sleep(0.01)
            starts.append(sim.transport.log[1][0] - t1)

    run_virtual(main)
    assert starts[0] == pytest.approx(5.0, abs=0.01)
    assert starts[1] < 0.01
    sim.check_final()


@pytest.mark.parametrize("spool", [False, True], ids=["report", "spool"])
def test_the_close_deadline_gives_up_what_is_unsettled_on_time(spool: bool) -> None:
    sim = scripted(
        max_batch_size=10, close_timeout=3.0, latency=100.0, spool=MemorySpool() if spool else None
    )
    took: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sim.track_some(plain=True, n=95)
        started = loop.time()
        await sim.tracker.aclose()
        took.append(loop.time() - started)

    run_virtual(main)
    assert took == [pytest.approx(3.0, abs=0.01)]
    stats = sim.tracker.stats
    sim.check_final()
    if spool:
        assert stats.spooled == 95 and sim.errors == []
    else:
        assert stats.failed == 95 and all(isinstance(e, ShutdownError) for e in sim.errors)


def test_soak_of_50000_events_under_mixed_faults_loses_nothing() -> None:
    n = 50_000
    policy = RetryPolicy(max_attempts=30, base_delay=0.01, max_delay=0.05)
    sim = scripted(retry=policy, request_timeout=0.5, latency=0.005, close_timeout=600.0)
    sim.transport.faults = {"5xx": 0.15, "429": 0.1, "reset": 0.025, "lost": 0.025, "timeout": 0.03}

    async def main() -> None:
        async with sim.tracker:
            sim.track_some(plain=True, n=n)

    run_virtual(main)
    sim.check_final()
    stats = sim.tracker.stats
    kinds = [entry[2] for entry in sim.transport.log]
    print(
        f"\nvirtual soak: {n} events, {len(kinds)} requests, "
        f"{sum(k != 'ok' for k in kinds)} faults, {stats.retries} retries"
    )
    assert (stats.delivered, stats.failed, stats.dropped) == (n, 0, 0)
    assert set(sim.server.stored) == set(range(n))  # each once: check_final saw no twice
    assert kinds.count("lost") > 0  # answers lost after storing were re-sent, de-duplicated
