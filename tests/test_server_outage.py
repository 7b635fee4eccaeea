"""Outages of the reference server (refused connections, a proxy's 502/503 page) and the
proxy body limit, over real loopback HTTP: with a plain aiohttp client, then a Tracker."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import anyio
import pytest

from lehnz_async import RetryPolicy, Tracker
from lehnz_async.testing import FaultPlan, ReferenceServer, nginx_page

from .conftest import Errors, track_many, user_ids

pytestmark = pytest.mark.anyio

MakeTracker = Callable[..., Tracker]
KEY = {"X-API-KEY": "lehnz_pk_test"}
VIEW = {"user_id": "usr_1", "event_family": "engagement", "event_name": "view"}
#: Retries that outlast a short outage (the brief's policy for these tests).
PATIENT = RetryPolicy(max_attempts=50, base_delay=0.01, max_delay=0.05)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, body: object = None) -> tuple[int, bytes]:
    async with http.post(url, json=[VIEW] if body is None else body, headers=KEY) as resp:
        return resp.status, await resp.read()


async def refused(host: str, port: int) -> bool:
    """Whether a TCP connection attempt to host:port is refused."""
    try:
        _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# -- "refuse" -------------------------------------------------------------------------------


async def test_refuse_stops_listening_then_listens_again_on_the_same_port(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    assert (await post(http, server.url))[0] == 202  # leaves a keep-alive connection open
    port = server.port
    await server.outage("refuse")
    assert server.is_down
    assert await refused(server.host, port)
    with pytest.raises(aiohttp.ClientError):  # the open connection was cut too
        await post(http, server.url)
    assert len(server.requests) == 1  # nothing reached the server
    await server.restore()
    assert not server.is_down
    assert server.port == port and not await refused(server.host, port)
    assert (await post(http, server.url))[0] == 202
    assert server.events == [VIEW, VIEW]
    ((kind, start, end),) = server.outages
    assert kind == "refuse" and end is not None and end >= start


async def test_an_https_server_comes_back_over_https() -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with (
        ReferenceServer(ssl_context=server_context) as server,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as http,
    ):
        await server.outage("refuse")
        await server.restore()
        assert (await post(http, server.url))[0] == 202


async def test_a_timed_refuse_outage_ends_by_itself(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    loop = asyncio.get_running_loop()
    before = loop.time()
    await server.outage("refuse", 0.2)
    assert await refused(server.host, server.port)
    await server.wait_for(lambda: not server.is_down, timeout=10)
    ((kind, start, end),) = server.outages
    assert kind == "refuse" and before <= start and end is not None
    assert end - start >= 0.2 - 1e-3
    assert (await post(http, server.url))[0] == 202


async def test_a_request_in_progress_loses_its_answer(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    server.faults.latency = 60.0  # the request waits in the server when the outage begins
    request = asyncio.ensure_future(post(http, server.url))
    await server.wait_for(lambda: server.in_flight == 1)
    await server.outage("refuse")
    with pytest.raises(aiohttp.ClientError):
        await request
    await server.wait_for(lambda: len(server.requests) == 1)
    assert server.requests[0].status == 0 and server.events == []  # unanswered, unprocessed


# -- "502" / "503" -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "title"), [("502", "502 Bad Gateway"), ("503", "503 Service Temporarily Unavailable")]
)
async def test_5xx_outage_answers_a_proxy_page(
    server: ReferenceServer, http: aiohttp.ClientSession, kind: str, title: str
) -> None:
    await server.outage(kind)  # type: ignore[arg-type]
    status = int(kind)
    async with http.post(server.url, json=[VIEW], headers=KEY) as resp:
        assert resp.status == status
        assert resp.content_type == "text/html"
        body = await resp.read()
    assert body == nginx_page(status)
    assert body.startswith(f"<html>\r\n<head><title>{title}</title></head>\r\n".encode())
    assert body.count(b"\r\n") >= 5
    async with http.post(server.recommend_url, json={"user_id": "u"}, headers=KEY) as resp:
        assert resp.status == status
    assert [r.status for r in server.requests] == [status]
    assert server.requests[0].body  # read and recorded as usual
    assert server.events == []
    await server.restore()
    assert (await post(http, server.url))[0] == 202
    assert server.events == [VIEW]
    assert [o.kind for o in server.outages] == [kind]


async def test_an_outage_replaces_the_one_in_progress(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    await server.restore()  # nothing to restore: a no-op
    assert server.outages == []
    await server.outage("refuse", 30)
    await server.outage("503", 0.1)  # listens again, answers 503 for 0.1 s
    assert (await post(http, server.url))[0] == 503
    await server.wait_for(lambda: not server.is_down)
    assert [(o.kind, o.end is not None) for o in server.outages] == [
        ("refuse", True),
        ("503", True),
    ]
    assert server.outages[0].end == server.outages[1].start
    assert (await post(http, server.url))[0] == 202


async def test_outage_arguments_are_checked(server: ReferenceServer) -> None:
    with pytest.raises(ValueError, match="kind must be one of refuse, 502, 503"):
        await server.outage("500")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seconds"):
        await server.outage("502", -1)
    assert not server.is_down
    with pytest.raises(RuntimeError, match="not started"):
        await ReferenceServer().outage("502")


def test_outages_run_on_the_loops_clock() -> None:
    """On virtual time (looptime) an hour-long outage passes at once, to the second."""

    async def main() -> None:
        async with ReferenceServer() as server:
            port = server.port
            await server.outage("refuse", 60)
            assert await refused(server.host, port)
            await asyncio.sleep(60)
            await server.wait_for(lambda: not server.is_down)
            assert not await refused(server.host, port)
            await server.outage("503", 3600)
            await asyncio.sleep(3600)
            assert not server.is_down
            assert [tuple(o) for o in server.outages] == [
                ("refuse", 0.0, 60.0),
                ("503", 60.0, 3660.0),
            ]

    started = time.monotonic()
    looptime = pytest.importorskip("looptime")
    loop = looptime.new_event_loop(noop_cycles=1)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert time.monotonic() - started < 10


# -- the proxy's body limit ----------------------------------------------------------------


async def test_proxy_body_limit_answers_nginx_413(http: aiohttp.ClientSession) -> None:
    async with ReferenceServer(faults=FaultPlan(proxy_body_limit=1000)) as server:
        big = [VIEW] * 30  # about 2 KB
        async with http.post(server.url, json=big, headers=KEY) as resp:
            assert resp.status == 413 and resp.content_type == "text/html"
            assert await resp.read() == nginx_page(413)

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            for _ in range(30):
                yield b" " * 100

        async with http.post(server.url, data=chunks(), headers=KEY) as resp:
            assert resp.status == 413 and await resp.read() == nginx_page(413)
        assert (await post(http, server.url))[0] == 202
        assert [(r.status, len(r.body)) for r in server.requests[:2]] == [(413, 0), (413, 0)]
        server.faults.max_body_size = 500  # the server's own limit is below: its JSON 413
        status, body = await post(http, server.url, [VIEW] * 10)
        assert status == 413 and b"the limit is 500 bytes" in body


async def test_proxy_body_limit_is_decided_from_content_length_before_the_body() -> None:
    async with ReferenceServer(faults=FaultPlan(proxy_body_limit=1000)) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            b"POST /api/v1/events/ingest HTTP/1.1\r\nHost: x\r\nX-API-KEY: lehnz_pk_test\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n["
        )
        await writer.drain()
        with anyio.fail_after(10):  # answered though 9,999,999 bytes never come
            status_line = await reader.readline()
        writer.close()
        assert status_line == b"HTTP/1.1 413 Request Entity Too Large\r\n"


# -- a Tracker across an outage --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["refuse", "502", "503"])
async def test_a_tracker_delivers_what_it_tracked_during_a_short_outage(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors, kind: str
) -> None:
    tracker = make_tracker(retry=PATIENT, max_batch_size=10)
    async with tracker:
        track_many(tracker, 20)
        await tracker.flush()
        await server.outage(kind, 0.3)  # type: ignore[arg-type]
        track_many(tracker, 100, start=20)
    stats = tracker.stats
    assert errors == []
    assert (stats.delivered, stats.failed) == (120, 0)
    assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(120))  # once each
    assert stats.retries > 0  # the outage was felt
    ((_, start, end),) = server.outages
    assert end is not None and end - start >= 0.3 - 1e-3
    if kind != "refuse":
        assert any(r.status == int(kind) for r in server.requests)


async def test_a_tracker_survives_a_refuse_outage_that_cuts_its_requests(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    server.faults.latency = 0.05
    tracker = make_tracker(retry=PATIENT, max_batch_size=5, max_concurrent_requests=4)
    async with tracker:
        track_many(tracker, 200)
        await server.wait_for(lambda: server.in_flight > 0)
        await server.outage("refuse", 0.3)  # requests in progress lose their answers
    assert errors == []
    assert tracker.stats.delivered == 200
    assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(200))
    assert any(r.status == 0 for r in server.requests)
