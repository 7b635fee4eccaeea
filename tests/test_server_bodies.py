"""Whatever the bytes, the reference server answers 2xx/4xx with the documented message,
never 500: malformed and hostile bodies, sizes, chunked and gzip bodies, slow clients,
and the bounded memory of a long-running server (``keep``). Raw loopback HTTP."""

from __future__ import annotations

import asyncio
import gzip
import random
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import msgspec
import pytest

from lehnz_async.testing import FaultPlan, ReferenceServer

pytestmark = pytest.mark.anyio

KEY = "lehnz_pk_test"
VIEW = {"user_id": "usr_1", "event_family": "engagement", "event_name": "view"}
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, body: Any, **headers: str) -> tuple[int, Any]:
    """POST raw bytes (or an async iterator of them: chunked); the status and the JSON."""
    headers.setdefault("X-API-KEY", KEY)
    headers.setdefault("Content-Type", "application/json")
    async with http.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def event(**fields: Any) -> dict[str, Any]:
    return {**VIEW, **fields}


def encode(value: Any) -> bytes:
    return msgspec.json.encode(value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(DEEP, "Malformed JSON", id="100000-deep"),
        pytest.param(
            b'[{"user_id": "u", "event_family": "engagement", "event_name": "view", '
            b'"context": ' + DEEP + b"}]",
            "Malformed JSON",
            id="100000-deep-context",
        ),
        pytest.param(
            b'[{"user_id": "u\xff\xfe", "event_family": "engagement", "event_name": "v"}]',
            "Malformed JSON",
            id="invalid-utf8-in-a-string",
        ),
        pytest.param(b"\xef\xbb\xbf" + encode([VIEW]), "Malformed JSON", id="bom"),
        pytest.param(
            b'[{"user_id": "u", "event_family": "engagement", "event_name": "v"',
            "Malformed JSON",
            id="truncated",
        ),
        pytest.param(b"", "Malformed JSON", id="empty"),
        pytest.param(b"5", "Malformed JSON", id="number"),
        pytest.param(b'"view"', "Malformed JSON", id="string"),
        pytest.param(b"null", "Malformed JSON", id="null"),
        pytest.param(b"[[]]", "Malformed JSON", id="array-of-arrays"),
        pytest.param(b"1e999", "Malformed JSON", id="huge-number"),
        pytest.param(encode([event(user_id=5)]), "Missing mandatory fields", id="user_id-a-number"),
        pytest.param(
            encode([event(event_name=["view"])]), "Missing mandatory fields", id="name-an-array"
        ),
        pytest.param(
            encode([event(event_family={"a": 1})]),
            "Missing mandatory fields",
            id="family-an-object",
        ),
        pytest.param(encode([event(user_id=None)]), "Missing mandatory fields", id="user_id-null"),
        pytest.param(
            encode({"user_id": "u", "event_name": "view"}),
            "Missing mandatory fields",
            id="no-family",
        ),
        pytest.param(
            encode([VIEW, event(event_family="fun")]), "Invalid event_family", id="bad-family"
        ),
    ],
)
async def test_bad_bodies_get_400_with_the_documented_message(
    server: ReferenceServer, http: aiohttp.ClientSession, body: bytes, message: str
) -> None:
    assert await post(http, server.url, body) == (400, {"error": message})
    assert server.events == []


async def test_random_bytes_never_get_a_500(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    rng = random.Random(20261126)
    valid = encode([VIEW, event(item_id="p1", context={"price": 9.5, "tags": ["a", "b"]})])
    statuses = set()
    for _ in range(300):
        mutated = bytearray(valid)
        for _ in range(rng.randrange(1, 8)):  # flip, insert or delete bytes
            i = rng.randrange(len(mutated))
            op = rng.randrange(3)
            if op == 0:
                mutated[i] = rng.randrange(256)
            elif op == 1:
                mutated.insert(i, rng.randrange(256))
            else:
                del mutated[i]
        body = bytes(mutated) if rng.random() < 0.9 else rng.randbytes(rng.randrange(1, 300))
        status, answer = await post(http, server.url, body)
        assert status in (202, 400), (status, body)
        statuses.add(status)
        if status == 400:
            assert answer["error"] in (
                "Malformed JSON",
                "Missing mandatory fields",
                "Invalid event_family",
            )
    assert statuses == {202, 400}


# -- sizes ---------------------------------------------------------------------------------


async def test_10_mb_with_content_length_gets_413(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    status, answer = await post(http, server.url, b"[" + b" " * 10_000_000 + b"]")
    assert status == 413 and "the limit is 1048576 bytes" in answer["error"]
    assert server.requests[0].body == b""  # not kept


async def test_413_is_decided_from_content_length_before_reading() -> None:
    async with ReferenceServer() as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            b"POST /api/v1/events/ingest HTTP/1.1\r\nHost: x\r\nX-API-KEY: lehnz_pk_test\r\n"
            b"Content-Length: 10000000\r\n\r\n["
        )
        await writer.drain()
        with anyio.fail_after(10):  # answered though the body never comes
            assert (await reader.readline()).startswith(b"HTTP/1.1 413 ")
        writer.close()


async def test_a_chunked_body_over_the_bound_gets_413(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for _ in range(100):  # 6.4 MB
            yield b" " * 64_000

    status, answer = await post(http, server.url, chunks())
    assert status == 413 and "Payload Too Large" in answer["error"]
    assert server.requests[0].status == 413 and server.events == []
    assert (await post(http, server.url, encode([VIEW])))[0] == 202  # and it carries on


async def test_a_chunked_body_within_the_bound_is_accepted(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    body = encode([VIEW] * 1000)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    assert await post(http, server.url, chunks()) == (202, {"accepted": 1000})


# -- gzip ----------------------------------------------------------------------------------


async def test_gzip_bodies_are_inflated(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    body = encode([event(user_id=f"usr_{i}") for i in range(2000)])
    zipped = gzip.compress(body)
    assert await post(http, server.url, zipped, **{"Content-Encoding": "gzip"}) == (
        202,
        {"accepted": 2000},
    )
    two_members = gzip.compress(body[:1000]) + gzip.compress(body[1000:])
    assert (await post(http, server.url, two_members, **{"Content-Encoding": "gzip"}))[0] == 202
    deflated = zlib.compress(encode([VIEW]))
    assert (await post(http, server.url, deflated, **{"Content-Encoding": "deflate"}))[0] == 202
    assert len(server.events) == 4001
    assert server.requests[0].body == zipped  # as on the wire


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(gzip.compress(encode([VIEW]), mtime=0)[:-12], id="truncated"),
        pytest.param(b"\x1f\x8b\x08\x00" + b"\x00" * 40, id="header-then-nonsense"),
        pytest.param(encode([VIEW]), id="not-compressed"),
        pytest.param(gzip.compress(encode([VIEW]), mtime=0) + b"trailing", id="trailing-bytes"),
        pytest.param(gzip.compress(b"\xff\xfe not json", mtime=0), id="not-json-inside"),
    ],
)
async def test_a_corrupt_gzip_stream_gets_400(
    server: ReferenceServer, http: aiohttp.ClientSession, body: bytes
) -> None:
    assert await post(http, server.url, body, **{"Content-Encoding": "gzip"}) == (
        400,
        {"error": "Malformed JSON"},
    )


async def test_a_gzip_bomb_gets_413(server: ReferenceServer, http: aiohttp.ClientSession) -> None:
    bomb = gzip.compress(b"[" + b" " * 200_000_000 + b"]", compresslevel=9)  # 200 MB
    assert len(bomb) < 300_000
    status, answer = await post(http, server.url, bomb, **{"Content-Encoding": "gzip"})
    assert status == 413 and "the limit is 1048576 bytes" in answer["error"]
    # exactly at the limit once inflated: accepted
    server.faults.max_body_size = len(encode([VIEW] * 10))
    exact = gzip.compress(encode([VIEW] * 10))
    assert (await post(http, server.url, exact, **{"Content-Encoding": "gzip"}))[0] == 202
    over = gzip.compress(encode([VIEW] * 10) + b" ")
    assert (await post(http, server.url, over, **{"Content-Encoding": "gzip"}))[0] == 413


async def test_an_unknown_encoding_gets_415(
    server: ReferenceServer, http: aiohttp.ClientSession
) -> None:
    status, answer = await post(http, server.url, b"xx", **{"Content-Encoding": "br"})
    assert status == 415 and answer == {"error": "Unsupported Content-Encoding: br"}


# -- slow clients --------------------------------------------------------------------------


async def test_a_body_that_trickles_in_is_cut_off_after_client_timeout() -> None:
    async with ReferenceServer(client_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            b"POST /api/v1/events/ingest HTTP/1.1\r\nHost: x\r\nX-API-KEY: lehnz_pk_test\r\n"
            b"Content-Length: 100\r\n\r\n[{"
        )
        await writer.drain()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with anyio.fail_after(10):
            status_line = await reader.readline()
            waited = loop.time() - started
            assert status_line == b"HTTP/1.1 408 Request Timeout\r\n"
            rest = await reader.read()  # then the server closes the connection
        writer.close()
        assert waited >= 0.3 - 0.05
        assert b"Connection: close" in rest and b"no body within 0.3 s" in rest
        assert [r.status for r in server.requests] == [408]


async def test_without_client_timeout_a_slow_body_is_waited_for(
    server: ReferenceServer,
) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    body = encode([VIEW])
    writer.write(
        b"POST /api/v1/events/ingest HTTP/1.1\r\nHost: x\r\nX-API-KEY: lehnz_pk_test\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:5]
    )
    await writer.drain()
    await server.wait_for(lambda: server.in_flight == 1)  # the server is waiting for it
    writer.write(body[5:])
    with anyio.fail_after(10):
        assert await reader.readline() == b"HTTP/1.1 202 Accepted\r\n"
    writer.close()


# -- keep: bounded memory ------------------------------------------------------------------


async def test_keep_holds_only_the_last_events_requests_and_keys(
    http: aiohttp.ClientSession,
) -> None:
    async with ReferenceServer(keep=3, keep_bodies=False) as server:
        for i in range(5):
            body = encode([event(user_id=f"usr_{i}"), event(user_id=f"usr_{i}b")])
            status, _ = await post(http, server.url, body, **{"Idempotency-Key": f"k{i}"})
            assert status == 202
        assert [e["user_id"] for e in server.events] == ["usr_3b", "usr_4", "usr_4b"]
        assert len(server.requests) == 3 and all(r.body == b"" for r in server.requests)
        # the last 3 keys are remembered; k0 and k1 were forgotten
        await post(http, server.url, encode([VIEW]), **{"Idempotency-Key": "k4"})
        assert server.duplicates == 1
        await post(http, server.url, encode([VIEW]), **{"Idempotency-Key": "k0"})
        assert server.duplicates == 1 and server.events[-1] == VIEW
        for _ in range(5):
            async with http.post(
                server.recommend_url, json={"user_id": "u"}, headers={"X-API-KEY": KEY}
            ) as resp:
                assert resp.status == 200
        assert len(server.recommendations) == 3


async def test_keep_none_keeps_everything(http: aiohttp.ClientSession) -> None:
    async with ReferenceServer(faults=FaultPlan()) as server:
        for i in range(5):
            await post(http, server.url, encode([event(user_id=f"usr_{i}")]))
        assert len(server.events) == 5 and all(r.body for r in server.requests)


def test_keep_and_client_timeout_are_checked() -> None:
    with pytest.raises(ValueError, match="keep"):
        ReferenceServer(keep=0)
    with pytest.raises(ValueError, match="client_timeout"):
        ReferenceServer(client_timeout=0)
