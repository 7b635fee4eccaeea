"""Shared fixtures and helpers: the reference server (the plugin's own fixture), trackers
that are closed and checked after each test, and one way to run a Python subprocess."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from lehnz_async import DeliveryError, RetryPolicy, Stats, Tracker
from lehnz_async._seams import Seams
from lehnz_async.testing import ReferenceServer

#: Retries fast enough for tests over loopback.
FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp runs on asyncio only


@pytest.fixture
def server(lehnz_server: ReferenceServer) -> ReferenceServer:
    """The plugin's ``lehnz_server``: a reference server on an ephemeral loopback port."""
    return lehnz_server


class Errors(list[DeliveryError]):
    """An on_error callback that keeps what it is given."""

    def __call__(self, error: DeliveryError) -> None:
        self.append(error)

    @property
    def events(self) -> list[Any]:
        return [event for error in self for event in error.events]


@pytest.fixture
def errors() -> Errors:
    return Errors()


@pytest.fixture
async def make_tracker(
    server: ReferenceServer, errors: Errors
) -> AsyncIterator[Callable[..., Tracker]]:
    """Build trackers pointed at the server, with fast retries; after the test each is
    closed (if the test did not) and its ledger checked: nothing left unsettled.
    ``seams=`` makes the engine with those (a failing disk's spool, say)."""
    made: list[Tracker] = []

    def make(seams: Seams | None = None, **options: Any) -> Tracker:
        options.setdefault("on_error", errors)
        options.setdefault("retry", FAST_RETRY)
        options.update(api_key=server.api_key, endpoint=server.url)
        tracker = Tracker(**options) if seams is None else Tracker._from_seams(seams, **options)
        made.append(tracker)
        return tracker

    yield make
    for tracker in made:
        await tracker.aclose()
        assert_ledger(tracker.stats)
        assert tracker.stats.queued == tracker.stats.in_flight == 0, tracker.stats


def assert_ledger(stats: Stats) -> None:
    """The one identity every scenario must keep."""
    assert stats.tracked == (
        stats.delivered
        + stats.failed
        + stats.dropped
        + stats.queued
        + stats.in_flight
        + stats.spooled
    ), stats


def track_many(tracker: Tracker, n: int, start: int = 0, **fields: Any) -> None:
    """Track ``n`` views from users ``usr_<start>`` on."""
    for i in range(start, start + n):
        tracker.track(f"usr_{i}", "view", item_id=f"prod_{i % 97}", **fields)


def user_ids(server: ReferenceServer) -> list[str]:
    return [e["user_id"] for e in server.events]


async def run_process(
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, str, str]:
    """Run ``python *args`` without blocking the loop (a server may run on it); the exit
    code, stdout and stderr. Killed after ``timeout`` seconds."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a Python program given as source; the exit code and its output (stdout, then
    stderr)."""
    code_, out, err = await run_process("-c", textwrap.dedent(code), *args, env=env)
    return code_, out + err


@pytest.fixture
def threaded_server() -> Iterator[ReferenceServer]:
    """A reference server on its own loop in a thread, for tests with no loop of their own."""
    loop = asyncio.new_event_loop()
    srv = ReferenceServer()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(srv.start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(srv.stop())
        loop.close()

    thread = threading.Thread(target=serve, name="reference-server", daemon=True)
    thread.start()
    assert ready.wait(10), "the reference server did not start"
    yield srv
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
