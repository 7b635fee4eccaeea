"""The event inspector's HTTP side, over real loopback HTTP: its JSON API, its live stream
(with browsers that go away or read too slowly), its assets, and ``lehnz-async serve`` /
``demo`` pointing to it. The page itself is tested in a browser in
``test_inspector_browser.py``."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec
import pytest

from lehnz_async import Tracker
from lehnz_async._inspector import MAX_CLIENT_BYTES
from lehnz_async.testing import ReferenceServer

from .test_cli import cli_env, run_cli

pytestmark = pytest.mark.anyio

TIMEOUT = 10.0
README_DIR = Path(__file__).resolve().parent.parent
KEY = "lehnz_pk_Sup3rSecretK3y"


def event(user: str, name: str = "view", family: str = "engagement", **more: Any) -> dict[str, Any]:
    return {"user_id": user, "event_family": family, "event_name": name, **more}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False) as session:
        yield session


@pytest.fixture
async def keyed() -> AsyncIterator[ReferenceServer]:
    async with ReferenceServer(api_keys={KEY}) as server:
        yield server


async def post(
    session: aiohttp.ClientSession,
    server: ReferenceServer,
    body: Any,
    *,
    key: str = KEY,
    **headers: str,
) -> int:
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    async with session.post(server.url, data=data, headers={"X-API-KEY": key, **headers}) as r:
        await r.read()
        return r.status


async def api(
    session: aiohttp.ClientSession, server: ReferenceServer, path: str, **params: Any
) -> Any:
    url = server.inspector.url + "inspector/api/" + path
    async with session.get(url, params={k: str(v) for k, v in params.items()}) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/json"
        return await response.json()


async def test_events_api_filters_and_shows_each_events_request(
    keyed: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    async with Tracker(KEY, endpoint=keyed.url) as tracker:
        tracker.track("usr_a", "view", item_id="prod_1")
        tracker.track("usr_b", "view", item_id="prod_1")
        tracker.track("usr_a", "purchase", item_id="prod_1", context={"price": 9.5})
        await tracker.flush()
        tracker.track("usr_a", "search", context={"query": "shoes"})
        tracker.track("usr_b", "checkout_start", item_id="prod_2")
    first, second = keyed.requests

    everything = await api(session, keyed, "events")
    assert [item["id"] for item in everything["events"]] == [1, 2, 3, 4, 5]
    assert [item["event"] for item in everything["events"]] == keyed.events
    assert everything["count"] == 5 and everything["last_id"] == 5
    assert everything["counters"] == {
        "events": 5, "requests": 2, "refused": 0, "duplicates": 0,
        "held": 5, "last_request": 2, "resets": 0,
    }  # fmt: skip
    request = everything["events"][0]["request"]
    assert request["idempotency_key"] == first.idempotency_key
    assert request["batch_size"] == 3 and request["status"] == 202
    assert request["outcome"] == "accepted"
    assert request["headers"]["X-API-KEY"] == "lehnz_pk_****"
    assert request["headers"]["Idempotency-Key"] == first.idempotency_key
    assert everything["events"][4]["request"]["idempotency_key"] == second.idempotency_key

    async def names(**filters: str) -> list[tuple[str, str]]:
        found = (await api(session, keyed, "events", **filters))["events"]
        return [(item["event"]["user_id"], item["event"]["event_name"]) for item in found]

    assert await names(user_id="usr_a") == [
        ("usr_a", "view"),
        ("usr_a", "purchase"),
        ("usr_a", "search"),
    ]
    assert await names(event_name="view") == [("usr_a", "view"), ("usr_b", "view")]
    assert await names(event_family="conversion") == [
        ("usr_a", "purchase"),
        ("usr_b", "checkout_start"),
    ]
    assert await names(user_id="usr_b", event_family="conversion", event_name="") == [
        ("usr_b", "checkout_start")
    ]
    assert await names(user_id="usr_") == []  # exact matches
    assert await names(after="3") == [("usr_a", "search"), ("usr_b", "checkout_start")]
    assert await names(user_id="usr_a", limit="2") == [("usr_a", "purchase"), ("usr_a", "search")]

    for bad in ({"limit": "0"}, {"limit": "x"}, {"after": "-1"}):
        async with session.get(keyed.inspector.url + "inspector/api/events", params=bad) as r:
            assert r.status == 400, bad
            assert "error" in await r.json()
    async with session.get(keyed.inspector.url + "inspector/api/events") as r:
        assert KEY.encode() not in await r.read()  # the key is nowhere in what is shown


async def test_refused_api_gives_status_message_and_the_refused_event(
    keyed: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    keyed.faults.reject_event = lambda e: "Item withdrawn" if e.get("item_id") == "gone" else None
    gone = event("usr_1", item_id="gone")
    missing = {"user_id": "usr_2", "event_name": "view"}  # no event_family
    bad_family = event("usr_3", family="fun")
    assert await post(session, keyed, [event("usr_0"), gone]) == 400
    assert await post(session, keyed, gzip.compress(msgspec.json.encode([event("usr_0"), missing])),
                      **{"Content-Encoding": "gzip"}) == 400  # fmt: skip
    assert await post(session, keyed, bad_family) == 400
    assert await post(session, keyed, [event("usr_0"), 42]) == 400
    assert await post(session, keyed, b'[{"user_id": "usr_4"') == 400
    assert await post(session, keyed, [event("usr_5")], key="lehnz_pk_wrong") == 401
    assert await post(session, keyed, [event("usr_5")], key="lehnz_sk_secret") == 403
    keyed.faults.proxy_body_limit = 10
    assert await post(session, keyed, [event("usr_6")]) == 413
    keyed.faults.proxy_body_limit = None
    keyed.faults.fail_next(1, 503, retry_after="1")
    assert await post(session, keyed, [event("usr_7")]) == 503
    keyed.faults.fail_next(1, process=True, drop_connection=True)
    with pytest.raises(aiohttp.ClientError):
        await post(session, keyed, [event("usr_8")])
    await keyed.wait_for(lambda: len(keyed.requests) == 10)

    data = await api(session, keyed, "refused")
    refused = data["refused"]
    shown = [(r["status"], r["message"], r["batch_size"], r["event"]) for r in refused]
    assert shown == [
        (400, "Item withdrawn", 2, gone),
        (400, "Missing mandatory fields", 2, missing),
        (400, "Invalid event_family", 1, bad_family),
        (400, "Malformed JSON", 2, 42),
        (400, "Malformed JSON", None, None),  # not JSON: no event to name
        (401, "Missing or invalid X-API-KEY", 1, None),
        (403, "Secret keys prohibited on public endpoints", 1, None),
        (413, "413 Request Entity Too Large", None, None),  # the proxy's page, body unread
        (503, "injected 503", 1, None),
        (0, "no answer: the connection was dropped after its events were stored", 1, None),
    ]
    assert all(r["outcome"] == "refused" for r in refused)
    assert [r["headers"]["X-API-KEY"] for r in refused[5:7]] == ["lehnz_pk_****", "lehnz_sk_****"]
    assert data["counters"]["refused"] == 10 and data["counters"]["requests"] == 10
    assert data["counters"]["events"] == 1  # usr_8's: stored, then the answer was lost
    (stored,) = (await api(session, keyed, "events"))["events"]
    assert stored["event"]["user_id"] == "usr_8" and stored["request"]["status"] == 0
    later = await api(session, keyed, "refused", after=refused[-2]["id"])
    assert [r["status"] for r in later["refused"]] == [0]


async def test_reset_clears_what_the_server_holds(
    keyed: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    batch = [event("usr_1"), event("usr_2")]
    assert await post(session, keyed, batch, **{"Idempotency-Key": "k1"}) == 202
    assert await post(session, keyed, batch, **{"Idempotency-Key": "k1"}) == 202
    assert await post(session, keyed, [event("usr_3", item_id="p1")], key="lehnz_pk_no") == 401
    assert keyed.duplicates == 1
    counters = await api(session, keyed, "counters")
    assert (counters["events"], counters["requests"], counters["duplicates"]) == (2, 3, 1)

    reset = keyed.inspector.url + "inspector/api/reset"
    async with session.post(reset, headers={"Origin": "http://evil.example"}) as r:
        assert r.status == 403  # another site's page may not wipe it
    assert len(keyed.events) == 2
    async with session.post(reset) as r:
        assert r.status == 200
        assert (await r.json())["reset"] is True
    assert keyed.events == [] and keyed.requests == [] and keyed.duplicates == 0
    counters = await api(session, keyed, "counters")
    assert counters == {
        "events": 0, "requests": 0, "refused": 0, "duplicates": 0,
        "held": 0, "last_request": 3, "resets": 1,
    }  # fmt: skip
    assert (await api(session, keyed, "events"))["events"] == []
    assert (await api(session, keyed, "refused"))["refused"] == []

    # the Idempotency-Keys seen are forgotten too: the same batch is new again
    assert await post(session, keyed, batch, **{"Idempotency-Key": "k1"}) == 202
    assert keyed.duplicates == 0 and len(keyed.events) == 2
    assert [item["id"] for item in (await api(session, keyed, "events"))["events"]] == [3, 4]


async def test_keep_bounds_what_the_inspector_holds(session: aiohttp.ClientSession) -> None:
    async with ReferenceServer(keep=5) as server:
        for r in range(3):
            batch = [event(f"usr_{r}_{i}") for i in range(4)]
            assert await post(session, server, batch, key=server.api_key) == 202
        for r in range(7):
            assert await post(session, server, {"user_id": f"bad_{r}"}, key=server.api_key) == 400
        events = await api(session, server, "events")
        assert [item["id"] for item in events["events"]] == [8, 9, 10, 11, 12]
        assert events["events"][0]["event"]["user_id"] == "usr_1_3"
        assert events["keep"] == 5
        assert events["counters"]["events"] == 12 and events["counters"]["held"] == 5
        refused = (await api(session, server, "refused"))["refused"]
        assert [r["event"]["user_id"] for r in refused] == [f"bad_{r}" for r in range(2, 7)]
        assert len(server.inspector.events()) == len(server.inspector.refused()) == 5


async def read_message(stream: aiohttp.StreamReader) -> tuple[str, Any]:
    """The next server-sent event (kind, data); comments are skipped."""
    kind, data = "message", None
    while True:
        line = (await stream.readline()).decode()
        assert line, "the stream ended"
        line = line.rstrip("\n")
        if not line:
            if data is not None:
                return kind, msgspec.json.decode(data)
            continue
        field, _, value = line.partition(": ")
        if field == "event":
            kind = value
        elif field == "data":
            data = value


async def test_stream_sends_each_request_live(
    server: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(server.inspector.url + "inspector/stream") as stream:
        assert stream.status == 200
        assert stream.content_type == "text/event-stream"
        await server.wait_for(lambda: server.inspector.streams == 1)
        with anyio.fail_after(TIMEOUT):
            async with Tracker(server.api_key, endpoint=server.url) as tracker:
                tracker.track("usr_1", "view", item_id="prod_1")
                tracker.track("usr_2", "purchase", item_id="prod_1", context={"price": 3.0})
            kind, message = await read_message(stream.content)
            assert kind == "request"
            assert message["request"]["status"] == 202
            assert message["request"]["idempotency_key"] == server.requests[0].idempotency_key
            assert message["request"]["headers"]["X-API-KEY"] == "lehnz_pk_****"
            assert [e["id"] for e in message["events"]] == [1, 2]
            assert [e["event"] for e in message["events"]] == server.events
            assert message["counters"]["events"] == 2

            assert await post(session, server, {"user_id": "x"}, key=server.api_key) == 400
            kind, message = await read_message(stream.content)
            assert (kind, message["request"]["outcome"], message["events"]) == (
                "request", "refused", [],
            )  # fmt: skip
            assert message["request"]["event"] == {"user_id": "x"}

            async with session.post(server.inspector.url + "inspector/api/reset") as r:
                assert r.status == 200
            kind, message = await read_message(stream.content)
            assert kind == "reset" and message["counters"]["events"] == 0


async def test_a_browser_that_went_away_is_forgotten(
    server: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(server.inspector.url + "inspector/stream") as stream:
        await stream.content.readline()
        assert server.inspector.streams == 1
    await session.close()  # the connection goes with it
    async with aiohttp.ClientSession(trust_env=False) as other:
        assert await post(other, server, event("usr_1"), key=server.api_key) == 202
    await server.wait_for(lambda: server.inspector.streams == 0, TIMEOUT)


async def test_a_browser_that_reads_too_slowly_is_cut_off(
    server: ReferenceServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream nobody reads: what waits for it stays bounded, then it is closed."""
    caplog.set_level(logging.WARNING, "lehnz_async.testing")
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window, never read
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (server.host, server.port))
        await loop.sock_sendall(
            sock, f"GET /inspector/stream HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode()
        )
        await server.wait_for(lambda: server.inspector.streams == 1, TIMEOUT)
        filler = "x" * 60_000
        sent = 0
        while server.inspector.streams and sent < 4 * MAX_CLIENT_BYTES:
            batch = [event(f"usr_{i}", context={"filler": filler}) for i in range(10)]
            assert await post(session, server, batch, key=server.api_key) == 202
            sent += 10 * len(filler)
        assert server.inspector.streams == 0, f"still streaming after {sent} bytes"
        assert any("fell" in r.getMessage() for r in caplog.records), caplog.text
        # the connection was cut: what the client can still read ends with a reset or EOF
        received = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), TIMEOUT):
                received += len(chunk)
        assert received < sent
    finally:
        sock.close()
    assert len(server.events) == 10 * (sent // (10 * len(filler)))  # ingestion unaffected


async def test_page_and_assets_are_served_self_contained(
    server: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    assets = {
        "": "text/html",
        "inspector/app.js": "text/javascript",
        "inspector/style.css": "text/css",
    }
    for path, content_type in assets.items():
        async with session.get(server.inspector.url + path) as r:
            assert r.status == 200, path
            assert r.content_type == content_type
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
            body = await r.text()
        assert not re.search(r"https?://|//cdn|@import", body), f"{path} loads from elsewhere"
        if path == "":
            assert "<title>Lehnz event inspector</title>" in body
            assert 'src="/inspector/app.js"' in body and 'href="/inspector/style.css"' in body
    async with session.get(server.inspector.url + "inspector/nothing.js") as r:
        assert r.status == 404


async def test_serve_prints_the_inspector_address() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lehnz_async", "serve", "--port", "0",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        with anyio.fail_after(60):
            lines = [(await proc.stdout.readline()).decode() for _ in range(3)]
            assert lines[0].startswith("listening on http://127.0.0.1:"), lines
            match = re.fullmatch(r"inspector: (http://127\.0\.0\.1:(\d+)/) \(.*\)\n", lines[2])
            assert match, lines
            assert match[2] in lines[0]
            async with aiohttp.ClientSession(trust_env=False) as session:
                async with session.get(match[1]) as r:
                    assert r.status == 200
                    assert "Lehnz event inspector" in await r.text()
                ingest = lines[0].split()[-1]
                async with session.post(
                    ingest, json=event("usr_1"), headers={"X-API-KEY": "lehnz_pk_test"}
                ) as r:
                    assert r.status == 202
                async with session.get(match[1] + "inspector/api/events") as r:
                    data = await r.json()
            assert [item["event"]["user_id"] for item in data["events"]] == ["usr_1"]
            assert data["keep"] == 10_000  # serve's bound holds for what it shows
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "Traceback" not in (await proc.stderr.read()).decode()


async def test_demo_ends_pointing_to_the_inspector() -> None:
    code, out, err = await run_cli("demo", "--events", "200", "--outage", "0")
    assert code == 0, err
    assert out.rstrip("\n").splitlines()[-1] == (
        "See your events live: `lehnz-async serve`, then open the printed address"
    )


async def test_the_readme_documents_the_api_that_exists(
    server: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    readme = (README_DIR / "README.md").read_text()
    section = readme.split("## The event inspector\n", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(GET|POST) (/inspector/api/\w+)[?`]", section, re.M)
    assert documented == [
        ("GET", "/inspector/api/events"),
        ("GET", "/inspector/api/refused"),
        ("GET", "/inspector/api/counters"),
        ("POST", "/inspector/api/reset"),
    ]
    for method, path in documented:
        async with session.request(method, server.base_url + path) as r:
            assert r.status == 200, path
            assert isinstance(await r.json(), dict)
    assert "(docs/images/inspector.png)" in section
    assert (README_DIR / "docs/images/inspector.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
