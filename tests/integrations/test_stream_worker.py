"""examples/stream_worker.py on a real Redis (issue 18): three worker processes share one
consumer group over a stream of 100,000 messages; one is SIGKILLed halfway, and the
survivors claim what it left pending (``XAUTOCLAIM``). Every message must reach the
reference server at least once, and the only duplicates allowed are the messages the
killed worker had sent but not yet acknowledged: the ones in its pending entries list
(``XPENDING``) at its death. The README's consumer-group example runs here too."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

pytest.importorskip("redis", reason="redis-py is not installed: pip install redis")

import redis.asyncio

from lehnz_async.testing import ReferenceServer

from ..conftest import run_process, run_python
from ..test_readme import EXAMPLES
from ._procs import (
    ROOT,
    Proc,
    needs_redis_server,
    redis_server,
    report,
    spawn,
    tracker_env,
)

pytestmark = [
    pytest.mark.anyio,
    needs_redis_server,
    pytest.mark.skipif(sys.platform == "win32", reason="kills a worker with SIGKILL"),
]

WORKER = ROOT / "examples" / "stream_worker.py"
BENCHMARK = ROOT / "benchmarks" / "stream_worker.py"
#: The issue's figure; LEHNZ_STREAM_MESSAGES=... for a quicker or a longer run.
MESSAGES = int(os.environ.get("LEHNZ_STREAM_MESSAGES", "100000"))
STREAM, GROUP = "events", "lehnz"
#: Seconds a message must be pending before a survivor claims it. A live worker touches
#: what it holds every third of this, so only a dead one's messages get this old.
MIN_IDLE = 4.0
#: Every wait of the test is bounded: a hang fails with what was seen so far.
TIMEOUT = 60.0

#: Adds ARGV[2] messages to KEYS[1] with the ids 1-ARGV[1] onwards (so the test knows
#: every id without reading them back): user, one of six event names, item.
FILL = """
local names = {'view', 'click', 'view', 'add_to_cart', 'view', 'purchase'}
local first = tonumber(ARGV[1])
for i = first, first + tonumber(ARGV[2]) - 1 do
  redis.call('XADD', KEYS[1], '1-' .. i, 'user', 'usr_' .. (i % 1000),
             'event', names[i % 6 + 1], 'item', 'prod_' .. (i % 5000))
end
return 0
"""


def connect(redis_url: str) -> redis.asyncio.Redis:
    """A client whose every command gives up after TIMEOUT seconds."""
    return redis.asyncio.Redis.from_url(redis_url, decode_responses=True, socket_timeout=TIMEOUT)


@pytest.fixture
async def redis_url(tmp_path: Path) -> AsyncIterator[str]:
    """A Redis server of its own (`_procs.redis_server`), stopped after the test."""
    async with redis_server(tmp_path) as url:
        yield url


async def fill(
    client: redis.asyncio.Redis, n: int, stream: str = STREAM, chunk: int = 10_000
) -> list[str]:
    """Add ``n`` messages to ``stream``, in Lua scripts of ``chunk`` (Redis stays
    responsive between them); their ids, in order."""
    for first in range(1, n + 1, chunk):
        await client.eval(FILL, 1, stream, first, min(chunk, n + 1 - first))  # type: ignore[misc]
    return [f"1-{i}" for i in range(1, n + 1)]


def worker_args(redis_url: str, consumer: str) -> tuple[str, ...]:
    return (
        str(WORKER), "--redis", redis_url, "--stream", STREAM, "--group", GROUP,
        "--consumer", consumer, "--min-idle", str(MIN_IDLE), "--claim-every", "0.5",
        "--block", "0.2", "--close-timeout", "5",
    )  # fmt: skip


def summary(proc: Proc) -> dict[str, int]:
    """The figures of the worker's last log line."""
    found = re.search(
        r"stopped: read (\d+) \(claimed (\d+), invalid (\d+)\), acked (\d+), "
        r"left pending (\d+), windows (\d+)",
        proc.text,
    )
    assert found, proc.text
    names = ("read", "claimed", "invalid", "acked", "left_pending", "windows")
    return dict(zip(names, map(int, found.groups()), strict=True))


async def test_a_worker_killed_halfway_duplicates_only_its_unacknowledged_messages(
    server: ReferenceServer, redis_url: str
) -> None:
    """3 workers, MESSAGES messages, w1 SIGKILLed once half of them have arrived."""
    began = time.monotonic()
    client = connect(redis_url)
    arrived: set[str] = set()  # distinct message ids the server holds, kept up to date
    server.subscribe(lambda _, events: arrived.update(e["context"]["stream_id"] for e in events))
    env = tracker_env(server)
    try:
        async with (
            spawn(*worker_args(redis_url, "w1"), env=env, cwd=ROOT) as victim,
            spawn(*worker_args(redis_url, "w2"), env=env, cwd=ROOT) as w2,
            spawn(*worker_args(redis_url, "w3"), env=env, cwd=ROOT) as w3,
        ):
            for proc in (victim, w2, w3):
                await proc.wait_for(r"reading 'events'")
            started = time.monotonic() - began
            ids = await fill(client, MESSAGES)

            # Halfway: SIGKILL w1 (no code of it runs: what it holds is lost). It is
            # frozen first (SIGSTOP), so that what it had read and not acknowledged can be
            # read at the moment it dies, and caught holding some: it may have just
            # acknowledged everything it had read, then it is let run on a moment.
            await server.wait_for(lambda: len(server.events) >= MESSAGES // 2, TIMEOUT)
            killed_at, killed_after = len(server.events), time.monotonic() - began
            for _ in range(100):
                os.killpg(victim.process.pid, signal.SIGSTOP)
                await asyncio.sleep(0.05)  # what it sent before is applied first
                pending = await client.xpending_range(
                    STREAM, GROUP, "-", "+", MESSAGES, consumername="w1"
                )
                if pending:
                    break
                os.killpg(victim.process.pid, signal.SIGCONT)
                await asyncio.sleep(0.01)
            os.killpg(victim.process.pid, signal.SIGKILL)
            await asyncio.wait_for(victim.process.wait(), TIMEOUT)
            unacked = {entry["message_id"] for entry in pending}
            oldest = max((entry["time_since_delivered"] for entry in pending), default=0)
            # Nobody could have claimed any of them yet (else this list would be short)
            assert oldest < MIN_IDLE * 1000, pending[:3]

            # The survivors claim them once they have been pending MIN_IDLE seconds.
            with anyio.fail_after(TIMEOUT):
                await server.wait_for(lambda: len(arrived) >= MESSAGES, TIMEOUT)
                all_arrived = time.monotonic() - began
                while (await client.xpending(STREAM, GROUP))["pending"]:  # noqa: ASYNC110 - Redis, polled
                    await asyncio.sleep(0.05)
            all_acked = time.monotonic() - began
            shutdowns = [await proc.stop(signal.SIGTERM, timeout=TIMEOUT) for proc in (w2, w3)]
        (group,) = await client.xinfo_groups(STREAM)
    finally:
        await client.aclose()

    for proc in (w2, w3):
        assert proc.process.returncode == 0, proc.text
        assert "Traceback" not in proc.text and "not delivered" not in proc.text, proc.text
    survivors = [summary(proc) for proc in (w2, w3)]

    # Every message reached the server at least once, and nothing else did.
    counts = Counter(event["context"]["stream_id"] for event in server.events)
    assert set(counts) == set(ids), (len(counts), len(ids))
    # The duplicates are exactly the messages the killed worker had delivered and not
    # acknowledged: each arrived twice, once from it and once from the survivor that
    # claimed it.
    duplicates = {stream_id for stream_id, n in counts.items() if n > 1}
    by_victim = {
        e["context"]["stream_id"] for e in server.events if e["context"]["consumer"] == "w1"
    }
    assert duplicates == unacked & by_victim, (len(duplicates), len(unacked & by_victim))
    assert all(counts[stream_id] == 2 for stream_id in duplicates)
    consumers = Counter(
        e["context"]["consumer"] for e in server.events if e["context"]["stream_id"] in duplicates
    )
    assert consumers["w1"] == len(duplicates), consumers
    # The kill left messages behind (else the claim path went untested), and the
    # survivors claimed every one of them: the group has nothing pending.
    assert unacked, f"w1 held nothing unacknowledged when killed:\n{victim.text[-3000:]}"
    assert sum(s["claimed"] for s in survivors) >= len(unacked), survivors
    assert sum(s["acked"] for s in survivors) >= MESSAGES - len(by_victim), survivors
    assert all(s["left_pending"] == 0 and s["invalid"] == 0 for s in survivors), survivors
    assert group["pending"] == 0 and group["entries-read"] == MESSAGES, group

    report(
        "stream worker, 3 processes, one SIGKILLed halfway",
        messages=MESSAGES,
        delivered=len(server.events),
        distinct=len(counts),
        killed_after_events=killed_at,
        unacked_at_kill=len(unacked),
        delivered_by_killed=len(by_victim),
        duplicates=len(duplicates),
        claimed=sum(s["claimed"] for s in survivors),
        started_s=started,
        killed_s=killed_after,
        all_arrived_s=all_arrived,
        all_acked_s=all_acked,
        shutdown_s=max(shutdowns),
        wall=time.monotonic() - began,
    )


async def test_the_readme_consumer_group_example(server: ReferenceServer, redis_url: str) -> None:
    """The README's example, as a program: it reads the stream until it is idle, and
    acknowledges every message once its event is delivered."""
    client = connect(redis_url)
    try:
        ids = await fill(client, 2_000, stream="orders")
        env = {**os.environ, **tracker_env(server), "REDIS_URL": redis_url}
        code, out = await run_python(EXAMPLES["stream"], env=env)
        assert code == 0, out
        counts = Counter(event["context"]["stream_id"] for event in server.events)
        assert counts == Counter(ids)  # each message once
        assert (await client.xpending("orders", "lehnz"))["pending"] == 0
    finally:
        await client.aclose()


async def test_the_benchmark_runs_both_modes() -> None:
    """benchmarks/stream_worker.py, tiny, so that it cannot rot: it checks itself that
    every message reached its server once and was acknowledged."""
    args = ("--messages", "2000", "--workers", "1", "--rounds", "1", "--json")
    code, out, err = await run_process(str(BENCHMARK), *args, timeout=TIMEOUT)
    assert code == 0, err
    result = json.loads(out)
    assert [run["mode"] for run in result["runs"]] == ["mark", "flush"], result
    assert all(run["messages_per_s"] > 0 for run in result["runs"]), result
