"""The README's examples run as they are written, against the reference server."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from lehnz_async import Tracker
from lehnz_async.testing import ReferenceServer, assert_tracked

from .conftest import run_python

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = dict(
    re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```", README.read_text(), re.S)
)


def test_the_readme_has_its_examples() -> None:
    assert {"use", "worker", "attribution", "user-test", "receipts"} <= set(EXAMPLES)


async def run_example(name: str, server: ReferenceServer) -> str:
    env = {**os.environ, "LEHNZ_API_KEY": server.api_key, "LEHNZ_ENDPOINT": server.url}
    code, out = await run_python(EXAMPLES[name], env=env)
    assert code == 0, out
    return out


@pytest.mark.anyio
async def test_use(server: ReferenceServer) -> None:
    out = await run_example("use", server)
    assert "delivered=5, failed=0" in out
    assert [e["event_name"] for e in server.events] == [
        "view", "purchase", "wishlist", "identify", "view",
    ]  # fmt: skip


@pytest.mark.anyio
async def test_receipts(server: ReferenceServer) -> None:
    out = await run_example("receipts", server)
    assert "Receipt(events=500, delivered=500, failed=0, dropped=0, filtered=0" in out
    assert "acknowledge the messages of this read" in out
    assert "Health(status='ok', reason=''" in out
    assert len(server.events) == 500


@pytest.mark.anyio
async def test_worker(server: ReferenceServer) -> None:
    await run_example("worker", server)
    assert_tracked(server.events, event_name="purchase", item_id="prod_1", count=100)


@pytest.mark.anyio
async def test_attribution_against_a_fresh_server(server: ReferenceServer) -> None:
    """As a new user runs it first: `lehnz-async serve` has ingested nothing yet, and
    /recommend answers an empty list."""
    await run_example("attribution", server)
    assert len(server.recommendations) == 1  # it asked
    assert [e["event_name"] for e in server.events] == []  # nothing shown, nothing clicked


@pytest.mark.anyio
async def test_attribution(server: ReferenceServer) -> None:
    async with Tracker(server.api_key, endpoint=server.url) as seeder:
        for i in range(30):
            seeder.track(f"usr_{i}", "view", item_id=f"prod_{i % 7}")
    await run_example("attribution", server)
    (rec_id,) = server.recommendations
    assert_tracked(server.events, event_family="exposure", recommendation_id=rec_id, count=7)
    assert_tracked(server.events, event_name="click", recommendation_id=rec_id, count=1)
    assert_tracked(server.events, event_name="purchase", recommendation_id=rec_id, count=1)


def test_user_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=EXAMPLES["user-test"])
    result = pytester.runpytest_subprocess()  # as a user runs it, in this environment
    result.assert_outcomes(passed=2)
