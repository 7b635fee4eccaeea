"""lehnz_async.celery on the real thing: a Celery worker (tests/integrations/apps/
shop_celery.py) on a real Redis broker, started on a loopback port by the test. Each task
tracks one event and then records in Redis that it ran; after SIGTERM (warm shutdown)
the server must hold exactly one event for each task that ran, and the worker must have
stopped within the stated bound."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

pytest.importorskip("celery", reason="Celery is not installed: pip install 'lehnz-async[celery]'")
pytest.importorskip("redis", reason="redis-py is not installed: pip install redis")

import redis.asyncio
from celery import Celery

from lehnz_async.testing import ReferenceServer

from ._procs import (
    assert_once,
    needs_redis_server,
    redis_server,
    report,
    spawn,
    tracker_env,
)

pytestmark = [
    pytest.mark.anyio,
    needs_redis_server,
    pytest.mark.skipif(sys.platform == "win32", reason="stops the worker with SIGTERM"),
]

SHUTDOWN_TIMEOUT = 5.0  # setup(shutdown_timeout=...): most seconds a process spends closing
#: The bound stated for a warm shutdown: the closes (pool processes close in parallel),
#: plus Celery's own stop (billiard waits 1 s in each ending pool process). Billiard may
#: add up to 30 s of its own under load (see apps/shop_celery.py), shortened here.
SHUTDOWN_BOUND = SHUTDOWN_TIMEOUT + 5.0
#: Tasks of the prefork run. The issue's 5,000 (100 recycled children) take about 25 s on
#: two cores, nearly all of it billiard replacing children (each waits 1 s as it ends),
#: with or without this integration; CI runs 500 (10 recycled children) unless told more.
TASKS = int(os.environ.get("LEHNZ_CELERY_TASKS", "500"))


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[str]:
    """A Redis server of its own (`_procs.redis_server`), stopped after the test."""
    async with redis_server(tmp_path) as url:
        yield url


def publish(broker_url: str, n: int) -> None:
    """Send ``n`` tasks ``track(i)`` (blocking: run it in a thread)."""
    app = Celery("publisher", broker=broker_url)
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task("track", (i,), producer=producer)


async def ran(broker_url: str, at_least: int, timeout: float = 60.0) -> set[str]:
    """Wait until ``at_least`` tasks have run; the ids of those that have."""
    client = redis.asyncio.Redis.from_url(broker_url)
    try:
        with anyio.fail_after(timeout):
            while await client.scard("ran") < at_least:  # noqa: ASYNC110 - Redis, polled
                await asyncio.sleep(0.02)
        return {member.decode() for member in await client.smembers("ran")}
    finally:
        await client.aclose()


CLOSED = re.compile(r"closed the tracker of process (\d+) in ([\d.]+) s")


def closes(output: str) -> dict[int, float]:
    """The seconds each process took to close its tracker, from the worker's log."""
    return {int(pid): float(took) for pid, took in CLOSED.findall(output)}


def worker_args(pool: str, *extra: str) -> tuple[str, ...]:
    return (
        "-m", "celery", "-A", "shop_celery", "worker", "--pool", pool, "--loglevel", "info",
        "--without-heartbeat", "--without-gossip", "--without-mingle", "-n", f"{pool}@127.0.0.1",
        *extra,
    )  # fmt: skip


async def run_worker(
    server: ReferenceServer,
    broker_url: str,
    pool: str,
    tasks: int,
    stop_after: int,
    *extra: str,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    delivering: bool = True,
    setup: str = "tracker",
) -> tuple[set[str], float, dict[int, float], str]:
    """Start a worker, send ``tasks`` tasks, SIGTERM it once ``stop_after`` have run; the
    ids of the tasks that ran, the seconds the shutdown took, the seconds each process
    took to close its tracker, and the worker's output. Each close must have kept within
    ``shutdown_timeout``; with ``delivering``, no event may have gone to ``on_error``.
    ``setup``: the app gives ``setup()`` its module-level "tracker", or a "factory"."""
    env = {**tracker_env(server), "CELERY_BROKER_URL": broker_url,
           "SHUTDOWN_TIMEOUT": str(shutdown_timeout), "LEHNZ_SETUP": setup}  # fmt: skip
    async with spawn(*worker_args(pool, *extra), env=env) as proc:
        sending = asyncio.create_task(asyncio.to_thread(publish, broker_url, tasks))
        await proc.wait_for(r"ready\.")
        await ran(broker_url, stop_after)
        shutdown = await proc.stop(signal.SIGTERM, timeout=60)
        await sending
    done = await ran(broker_url, 0)
    assert proc.process.returncode == 0, proc.text
    if delivering:
        assert "NOT DELIVERED" not in proc.text, proc.text  # the app's on_error
    assert "Traceback" not in proc.text, proc.text
    took = closes(proc.text)
    assert took, proc.text
    assert max(took.values()) < shutdown_timeout + 0.5, took
    return done, shutdown, took, proc.text


async def test_prefork_children_recycled_every_50_tasks_deliver_every_event_once(
    server: ReferenceServer, broker: str
) -> None:
    began = time.monotonic()
    done, shutdown, took, output = await run_worker(
        server, broker, "prefork", TASKS, TASKS, "--concurrency", "2", "--max-tasks-per-child", "50"
    )
    assert len(done) == TASKS
    assert len(took) >= TASKS // 50, took  # every recycled pool process closed its tracker
    assert_once(server, (f"task_{i}" for i in done))
    assert shutdown < SHUTDOWN_BOUND, output
    report(
        "celery prefork -c 2 --max-tasks-per-child 50",
        tracked=TASKS,
        delivered=len(server.events),
        closes=len(took),
        slowest_close=max(took.values()),
        shutdown=shutdown,
        wall=time.monotonic() - began,
    )


async def test_prefork_worker_stopped_in_the_middle_of_the_load_loses_nothing(
    server: ReferenceServer, broker: str
) -> None:
    began = time.monotonic()
    done, shutdown, took, output = await run_worker(
        server, broker, "prefork", 1000, 120, "--concurrency", "2", "--max-tasks-per-child", "50"
    )
    assert 120 <= len(done) < 1000, len(done)
    assert_once(server, (f"task_{i}" for i in done))
    assert shutdown < SHUTDOWN_BOUND, output
    report(
        "celery prefork, SIGTERM mid-load",
        tracked=len(done),
        delivered=len(server.events),
        slowest_close=max(took.values()),
        shutdown=shutdown,
        wall=time.monotonic() - began,
    )


@pytest.mark.parametrize("pool", ["solo", "threads"])
async def test_solo_and_threads_pools_deliver_every_event_once(
    server: ReferenceServer, broker: str, pool: str
) -> None:
    began = time.monotonic()
    tasks = 500
    done, shutdown, took, output = await run_worker(server, broker, pool, tasks, tasks, "-c", "4")
    assert len(done) == tasks
    assert len(took) == 1, took  # the main process, at worker_shutdown
    assert_once(server, (f"task_{i}" for i in done))
    assert shutdown < SHUTDOWN_BOUND, output
    report(
        f"celery {pool}",
        tracked=tasks,
        delivered=len(server.events),
        close=max(took.values()),
        shutdown=shutdown,
        wall=time.monotonic() - began,
    )


async def test_with_the_server_down_at_shutdown_the_worker_stops_in_time_and_reports_all(
    server: ReferenceServer, broker: str
) -> None:
    """Nothing can be delivered: each pool process gives up at its deadline and reports
    what it held to on_error (the app logs it), the shutdown stays within the bound."""
    began, timeout, tasks = time.monotonic(), 2.0, 200
    await server.outage("refuse")  # connections refused until the end of the test
    done, shutdown, took, output = await run_worker(
        server, broker, "prefork", tasks, tasks, "--concurrency", "2",
        shutdown_timeout=timeout, delivering=False,
    )  # fmt: skip
    # both pool processes tried until their deadline (the main process held nothing)
    assert sum(seconds > timeout - 0.5 for seconds in took.values()) >= 2, took
    assert len(done) == tasks
    assert server.events == []
    reported = sum(int(n) for n in re.findall(r"NOT DELIVERED: (\d+) event", output))
    assert reported == tasks, output
    assert shutdown < timeout + SHUTDOWN_BOUND - SHUTDOWN_TIMEOUT, output
    report(
        "celery prefork, server down at shutdown",
        tracked=tasks,
        delivered=0,
        reported=reported,
        slowest_close=max(took.values()),
        shutdown=shutdown,
        wall=time.monotonic() - began,
    )
