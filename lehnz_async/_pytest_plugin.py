"""The lehnz_async pytest plugin, registered through the ``pytest11`` entry point.

Fixtures (async ones run under the anyio pytest plugin: mark tests ``@pytest.mark.anyio``):

- ``lehnz_server``: a running `ReferenceServer` on loopback; inspect ``.events``.
- ``lehnz_tracker``: a `Tracker` wired to ``lehnz_server``, with fast retries; closed
  (and so flushed) at teardown.
- ``lehnz_capture``: a ``Tracker(capture=True)``: records instead of sending; use
  ``lehnz_async.testing.assert_tracked`` on it after ``await tracker.flush()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._retry import RetryPolicy
from ._tracker import Tracker
from .testing import ReferenceServer


@pytest.fixture
async def lehnz_server() -> AsyncIterator[ReferenceServer]:
    """A reference ingestion server on an ephemeral loopback port."""
    async with ReferenceServer() as server:
        yield server


@pytest.fixture
async def lehnz_tracker(lehnz_server: ReferenceServer) -> AsyncIterator[Tracker]:
    """A tracker sending to ``lehnz_server``; closed at teardown."""
    tracker = Tracker(
        lehnz_server.api_key,
        endpoint=lehnz_server.url,
        flush_interval=0.05,
        retry=RetryPolicy(base_delay=0.01, max_delay=0.1),
    )
    async with tracker:
        yield tracker


@pytest.fixture
async def lehnz_capture() -> AsyncIterator[Tracker]:
    """A tracker that records events in memory instead of sending them."""
    async with Tracker(capture=True) as tracker:
        yield tracker
