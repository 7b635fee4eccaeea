"""Delivery under faults: retries, rate limits, revoked keys, overflow, the spool."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lehnz_async import ConfigurationError, RetriesExhaustedError, RetryPolicy, Tracker
from lehnz_async.testing import Fault, FaultPlan, ReferenceServer

from .conftest import Errors, assert_ledger, track_many, user_ids

pytestmark = pytest.mark.anyio

MakeTracker = Callable[..., Tracker]


async def test_soak_under_mixed_faults_loses_nothing(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    """Over real HTTP, short; the 50,000-event soak runs on virtual time
    (test_virtual_time.py)."""
    n = 5_000
    server.faults = FaultPlan(
        seed=20261126,
        random_faults=[
            (0.15, Fault(500)),
            (0.05, Fault(503, retry_after="0")),
            (0.10, Fault(429, retry_after="0.2")),
            (0.025, Fault(drop_connection=True)),
            (0.025, Fault(drop_connection=True, process=True)),  # stored, answer lost
            (0.03, Fault(delay=0.3, process=True)),  # stored, answer too late
        ],
    )
    tracker = make_tracker(
        max_batch_size=100,
        request_timeout=0.2,
        retry=RetryPolicy(max_attempts=30, base_delay=0.01, max_delay=0.05),
        close_timeout=60,
    )
    started = time.monotonic()
    async with tracker:
        track_many(tracker, n)
    wall = time.monotonic() - started
    stats = tracker.stats
    statuses = [r.status for r in server.requests]
    # the figures quoted in the closing note come from this line (pytest -s shows it)
    print(
        f"\nsoak: {n} events, {len(server.requests)} requests, "
        f"{sum(s != 202 for s in statuses)} faults injected, {stats.retries} retries, "
        f"{server.duplicates} duplicate requests sent and caught by Idempotency-Key, "
        f"{len(server.events)} events stored, lost {n - len(set(user_ids(server)))}, "
        f"wall {wall:.1f} s"
    )
    assert errors == []
    assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(n))  # exactly once
    assert server.duplicates > 0  # retries of answers lost after storing were caught
    assert (stats.delivered, stats.failed, stats.dropped) == (n, 0, 0)
    assert_ledger(stats)


async def test_retry_after_pauses_the_whole_sender(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    server.faults.fail_next(1, 429, retry_after="1")
    tracker = make_tracker(max_batch_size=10, max_concurrent_requests=4)
    async with tracker:
        track_many(tracker, 200)
    limited = server.requests[0]
    assert limited.status == 429
    pause_ends = limited.answered_at + 1.0
    meanwhile = [r for r in server.requests if limited.answered_at < r.received_at < pause_ends]
    # requests the other slots had already sent may land just after the 429 is answered;
    # none may start after the client has read it
    assert len(meanwhile) <= 3
    assert all(r.received_at - limited.answered_at < 0.1 for r in meanwhile)
    assert any(r.received_at >= pause_ends for r in server.requests)
    assert len(server.events) == 200


async def test_retry_after_is_honoured(server: ReferenceServer, make_tracker: MakeTracker) -> None:
    """Over real HTTP; the HTTP-date form is parsed in test_retry.py, and the pause of
    every slot is checked on virtual time too (test_virtual_time.py)."""
    server.faults.fail_next(1, 503, retry_after="1")
    async with make_tracker() as tracker:
        tracker.track("usr_1", "view")
    first, second = server.requests
    assert second.received_at - first.answered_at >= 1.0
    assert len(server.events) == 1


async def test_a_revoked_key_is_reported_once_loudly_without_a_retry_storm(
    make_tracker: MakeTracker, errors: Errors, caplog: pytest.LogCaptureFixture
) -> None:
    async with ReferenceServer(api_keys={"lehnz_pk_live"}) as server:
        tracker = Tracker("lehnz_pk_live", endpoint=server.url, on_error=errors, max_batch_size=10)
        async with tracker:
            track_many(tracker, 10)
            await tracker.flush()
            server.revoke("lehnz_pk_live")
            with caplog.at_level(logging.DEBUG, "lehnz_async"):
                track_many(tracker, 100, start=10)
        assert len(server.requests) == 1 + 10  # one per batch, no retries
    assert tracker.stats.retries == 0
    assert len(errors) == 10 and all(e.status == 401 for e in errors)
    assert len(errors.events) == 100
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(loud) == 1 and "API key was refused" in loud[0].getMessage()
    assert_ledger(tracker.stats)


async def test_overflow_drop_oldest_keeps_the_newest(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    tracker = make_tracker(max_queue_size=1_000, overflow="drop_oldest")
    async with tracker:
        track_many(tracker, 1_500)  # the flusher cannot run in between
    assert user_ids(server) == [f"usr_{i}" for i in range(500, 1_500)]
    assert tracker.stats.dropped == 500
    assert_ledger(tracker.stats)


async def test_atrack_waits_for_room_instead_of_dropping(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    server.faults.latency = 0.02
    tracker = make_tracker(max_batch_size=10, max_queue_size=20, max_concurrent_requests=2)
    deepest = 0
    async with tracker:
        for i in range(300):
            await tracker.atrack(f"usr_{i}", "view")
            deepest = max(deepest, tracker.stats.queued)
    assert deepest <= 20
    assert tracker.stats.dropped == 0
    # two requests in flight at once may reach the server in either order
    assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(300))


def test_an_unknown_overflow_policy_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="atrack"):
        Tracker("lehnz_pk_test", overflow="block")


async def test_exhausted_retries_go_to_the_spool_and_are_resent_on_next_start(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.sqlite3"
    server.faults.random_faults = [(1.0, Fault(503))]
    tracker = make_tracker(
        outage_grace=None,  # outage mode off: retries run out and spool, as in 0.1
        spool_path=spool,
        retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.05),
        max_batch_size=10,
    )
    async with tracker:
        track_many(tracker, 25)
    assert errors == [] and server.events == []
    assert tracker.stats.spooled == 25 and tracker.stats.failed == 0
    assert_ledger(tracker.stats)
    keys_before = {r.idempotency_key for r in server.requests}

    server.faults.random_faults = []
    again = make_tracker(spool_path=spool)
    async with again:
        pass
    assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(25))
    assert {r.idempotency_key for r in server.requests[-3:]} <= keys_before  # same batches
    assert again.stats.delivered == 25 and again.stats.tracked == 25
    assert_ledger(again.stats)

    third = make_tracker(spool_path=spool)
    async with third:
        pass
    assert third.stats.tracked == 0  # the spool was emptied


async def test_the_close_deadline_spools_what_is_in_flight_and_queued(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.sqlite3"
    server.faults.latency = 0.8  # the server stores after this delay: answers come too late
    tracker = make_tracker(spool_path=spool, max_batch_size=10, max_concurrent_requests=2)
    track_many(tracker, 100)
    await tracker.aclose(timeout=0.3)
    assert errors == [] and tracker.stats.spooled == 100
    assert_ledger(tracker.stats)

    server.faults.latency = 0.0
    async with make_tracker(spool_path=spool):
        pass
    # the 20 events of the two batches that were in flight at the deadline may also have
    # been stored by the slow server; their re-sent copies carry the same Idempotency-Key
    await server.wait_for(lambda: server.in_flight == 0)
    assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(100))


CHILD = """
import asyncio, sys
from lehnz_async import RetryPolicy, Tracker

async def main(url, key, path, n):
    retry = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.05)
    tracker = Tracker(key, endpoint=url, spool_path=path, retry=retry, close_timeout=5,
                      outage_grace=None)  # retries run out and spool, as in 0.1
    async with tracker:
        for i in range(n):
            tracker.track(f"usr_{i}", "view")
    print("CLOSED", tracker.stats.spooled, tracker.stats.delivered, flush=True)
    sys.stdin.readline()  # wait here to be killed

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


async def run_child_until_closed(server: ReferenceServer, spool: Path, n: int) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, server.url, server.api_key, str(spool), str(n),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean exit: only what aclose() made durable
        await proc.wait()
    return line.decode().split()


async def test_the_spool_survives_sigkill_and_a_real_restart(
    server: ReferenceServer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.sqlite3"
    server.faults.random_faults = [(1.0, Fault(503))]
    assert await run_child_until_closed(server, spool, 1_234) == ["CLOSED", "1234", "0"]
    assert server.events == [] and spool.stat().st_size > 0

    server.faults.random_faults = []
    assert await run_child_until_closed(server, spool, 0) == ["CLOSED", "0", "1234"]
    assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(1_234))


async def test_without_a_spool_exhausted_retries_are_reported(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    server.faults.random_faults = [(1.0, Fault(500))]
    async with make_tracker(
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
        outage_grace=None,  # outage mode off: the retry policy alone decides
    ) as tracker:
        track_many(tracker, 3)
    (error,) = errors
    assert isinstance(error, RetriesExhaustedError) and len(error.events) == 3
    assert tracker.stats.failed == 3
    assert_ledger(tracker.stats)


OUTAGE_CHILD = """
import asyncio, sqlite3, sys
from lehnz_async import Tracker

async def main(url, key, path):
    # outage mode at its defaults, a small memory budget: what it cannot hold spills
    tracker = Tracker(key, endpoint=url, spool_path=path, max_buffer_bytes=300_000,
        max_batch_bytes=100_000,
                      max_batch_size=50, flush_interval=0.05)
    await tracker.start()
    i = 0
    while True:  # 2,000 events/s until killed
        for _ in range(20):
            tracker.track(f"usr_{i}", "view", context={"pad": "x" * 200})
            i += 1
        await asyncio.sleep(0.01)
        if i % 1000 == 0 and tracker.stats.state == "outage":
            rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM batches").fetchone()[0]
            if rows >= 10:
                print("SPILLED", rows, flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


async def test_a_sigkill_during_an_outage_loses_nothing_that_was_spilled(
    server: ReferenceServer, tmp_path: Path
) -> None:
    import sqlite3

    import msgspec

    spool = tmp_path / "spool.sqlite3"
    server.faults.random_faults = [(1.0, Fault(503, body=b"<html>503</html>"))]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OUTAGE_CHILD, server.url, server.api_key, str(spool),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
    finally:
        proc.send_signal(signal.SIGKILL)  # in the middle of the outage
        await proc.wait()
    assert line.startswith(b"SPILLED"), line
    assert server.events == []
    spilled = set()
    with sqlite3.connect(spool) as conn:
        for (body,) in conn.execute("SELECT body FROM batches"):
            spilled.update(e["user_id"] for e in msgspec.json.decode(body))
    # at least a row's worth each (rows hold up to 50: fewer once a batch was split)
    assert len(spilled) >= int(line.split()[1]) >= 10

    server.faults.random_faults = []
    async with Tracker(server.api_key, endpoint=server.url, spool_path=spool) as tracker:
        pass  # the restart re-sends the spool, oldest first, with the original keys
    assert set(user_ids(server)) == spilled
    assert len(user_ids(server)) == len(spilled)  # each once
    assert tracker.stats.delivered == len(spilled)
