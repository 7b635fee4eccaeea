"""Shared fixtures: a reference server on loopback and a tracker wired to it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from lehnz_async import DeliveryError, RetryPolicy, Stats, Tracker
from lehnz_async.testing import ReferenceServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp runs on asyncio only


@pytest.fixture
async def server() -> AsyncIterator[ReferenceServer]:
    async with ReferenceServer() as srv:
        yield srv


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
def make_tracker(server: ReferenceServer, errors: Errors) -> Callable[..., Tracker]:
    """Build trackers pointed at the server, with fast retries; each is checked at the end."""

    def make(**options: Any) -> Tracker:
        options.setdefault("on_error", errors)
        options.setdefault("retry", RetryPolicy(base_delay=0.01, max_delay=0.05))
        return Tracker(server.api_key, endpoint=server.url, **options)

    return make


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
