"""The reference server implements the documented contract (raw HTTP, no tracker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from lehnz_async.testing import FaultPlan, ReferenceServer

pytestmark = pytest.mark.anyio

KEY = "lehnz_pk_test"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    url: str,
    body: Any,
    key: str | None = KEY,
    **headers: str,
) -> tuple[int, Any]:
    if key is not None:
        headers["X-API-KEY"] = key
    data = body if isinstance(body, bytes) else None
    json = None if isinstance(body, bytes) else body
    async with http.post(url, data=data, json=json, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


VIEW = {"user_id": "usr_1", "event_family": "engagement", "event_name": "view"}


async def test_accepts_an_array_and_a_single_object(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    assert await post(http, server.url, [VIEW, VIEW]) == (202, {"accepted": 2})
    assert await post(http, server.url, VIEW) == (202, {"accepted": 1})
    assert server.events == [VIEW, VIEW, VIEW]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([{"user_id": "u", "event_name": "view"}], "Missing mandatory fields"),  # curl example
        ([VIEW, {"event_family": "engagement", "event_name": "view"}], "Missing mandatory fields"),
        ([{**VIEW, "user_id": ""}], "Missing mandatory fields"),
        ([{**VIEW, "event_family": "fun"}], "Invalid event_family"),
        ([VIEW, 3], "Malformed JSON"),
        (b"{not json", "Malformed JSON"),
    ],
)
async def test_rejects_the_whole_array_with_the_documented_message(
    server: ReferenceServer, http: aiohttp.ClientSession, body: Any, message: str
) -> None:
    assert await post(http, server.url, body) == (400, {"error": message})
    assert server.events == []


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [
        (None, 401, "Missing or invalid X-API-KEY"),
        ("nonsense", 401, "Missing or invalid X-API-KEY"),
        ("lehnz_sk_live_1", 403, "Secret keys prohibited on public endpoints"),
    ],
)
async def test_key_rules(
    server: ReferenceServer,
    http: aiohttp.ClientSession,
    key: str | None,
    status: int,
    message: str,
) -> None:
    assert await post(http, server.url, [VIEW], key=key) == (status, {"error": message})


async def test_a_listed_key_set_and_revocation(http: aiohttp.ClientSession) -> None:
    async with ReferenceServer(api_keys={"lehnz_pk_a"}) as server:
        assert (await post(http, server.url, [VIEW], key="lehnz_pk_b"))[0] == 401
        assert (await post(http, server.url, [VIEW], key="lehnz_pk_a"))[0] == 202
        server.revoke("lehnz_pk_a")
        assert (await post(http, server.url, [VIEW], key="lehnz_pk_a"))[0] == 401


async def test_idempotency_key_deduplicates(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    for _ in range(3):
        status, _ = await post(http, server.url, [VIEW], **{"Idempotency-Key": "k1"})
        assert status == 202
    assert len(server.events) == 1 and server.duplicates == 2


async def test_fault_plan_statuses_and_body_limit(http: aiohttp.ClientSession) -> None:
    async with ReferenceServer(faults=FaultPlan(max_body_size=100)) as server:
        server.faults.fail_next(1, 429, retry_after="7")
        async with http.post(server.url, json=[VIEW], headers={"X-API-KEY": KEY}) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "7"
        status, body = await post(http, server.url, [VIEW] * 5)
        assert status == 413 and "100 bytes" in body["error"]
        assert await post(http, server.url, [VIEW]) == (202, {"accepted": 1})


async def test_fault_plan_drops_the_connection(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    server.faults.fail_next(1, drop_connection=True)
    with pytest.raises(aiohttp.ClientError):
        await post(http, server.url, [VIEW])
    assert server.requests[0].status == 0 and server.events == []


async def test_recommend_returns_popular_items(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    events = [{**VIEW, "item_id": item} for item in ["a", "b", "b", "c", "b", "c"]]
    await post(http, server.url, events)
    status, body = await post(http, server.recommend_url, {"user_id": "usr_1", "limit": 2})
    assert status == 200
    assert body["all_item_ids"] == ["b", "c"]
    assert server.recommendations[body["recommendation_id"]] == ["b", "c"]
