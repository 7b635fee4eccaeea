"""The event inspector's HTTP side, over real loopback HTTP: its JSON API, its live stream
(with browsers that go away or read too slowly), its assets, and ``lehnz-async serve`` /
``demo`` pointing to it. The page itself is tested in a browser in
``test_inspector_browser.py``."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import io
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
        sys.executable, "-m", "lehnz_async", "serve", "--port", "0", "--allow-host", "Box.lan",
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
                for host, status in (("box.lan:8080", 200), ("rebind.test", 403)):  # --allow-host
                    async with session.get(match[1], headers={"Host": host}) as r:
                        assert r.status == status, host
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
        ("GET", "/inspector/api/timeline"),
        ("GET", "/inspector/api/export"),
        ("GET", "/inspector/api/refused"),
        ("GET", "/inspector/api/counters"),
        ("POST", "/inspector/api/reset"),
    ]
    query = {"timeline": "?user_id=usr_1", "export": "?format=json"}
    for method, path in documented:
        url = server.base_url + path + query.get(path.rpartition("/")[2], "")
        async with session.request(method, url) as r:
            assert r.status == 200, path
            assert isinstance(await r.json(), (dict, list))
    for image in ("inspector.png", "inspector-timeline.png"):
        assert f"(docs/images/{image})" in section
        assert (README_DIR / "docs/images" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--allow-host" in section


# -- filters, search, paging, timeline, export (issue 17) -----------------------------------


async def test_more_filters_search_and_paging(
    keyed: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    batch = [
        event("usr_a", item_id="prod_1", session_id="s1"),
        event("usr_a", "click", item_id="prod_2", session_id="s1", recommendation_id="rec_9"),
        event("usr_b", "search", session_id="s2", context={"query": "Red Running SHOES"}),
        event(
            "usr_b",
            "purchase",
            "conversion",
            item_id="prod_2",
            recommendation_id="rec_9",
            context={"price": 89.9, "gift_wrap": True},
        ),
        event("usr_c", item_id="prod_1", context={"nested": [{"colour": "teal"}]}),
    ]
    assert await post(session, keyed, batch) == 202

    async def ids(**params: Any) -> list[int]:
        return [item["id"] for item in (await api(session, keyed, "events", **params))["events"]]

    assert await ids(item_id="prod_1") == [1, 5]
    assert await ids(session_id="s1") == [1, 2]
    assert await ids(recommendation_id="rec_9") == [2, 4]
    assert await ids(recommendation_id="rec_9", item_id="prod_2", user_id="usr_b") == [4]
    assert await ids(item_id="prod_") == []  # exact, unlike the search
    assert await ids(q="running shoes") == [3]  # case-insensitive, inside context
    assert await ids(q="89.9") == [4]  # numbers as written
    assert await ids(q="gift_wrap") == [4]  # a context key
    assert await ids(q="TEAL") == [5]  # at any depth
    assert await ids(q="prod_") == [1, 2, 4, 5]
    assert await ids(q="user_id") == []  # not the event's own field names
    assert await ids(q="prod_", session_id="s1") == [1, 2]

    # paging backwards: the last `limit` before an id, and whether older ones match
    page = await api(session, keyed, "events", limit=2)
    assert [i["id"] for i in page["events"]] == [4, 5] and page["more"] is True
    page = await api(session, keyed, "events", limit=2, before=4)
    assert [i["id"] for i in page["events"]] == [2, 3] and page["more"] is True
    page = await api(session, keyed, "events", limit=2, before=2)
    assert [i["id"] for i in page["events"]] == [1] and page["more"] is False
    page = await api(session, keyed, "events", limit=2, before=5, q="prod_")
    assert [i["id"] for i in page["events"]] == [2, 4] and page["more"] is True
    assert (await api(session, keyed, "events"))["more"] is False
    async with session.get(keyed.inspector.url + "inspector/api/events?before=x") as r:
        assert r.status == 400 and "before" in (await r.json())["error"]


async def test_timeline_joins_anonymous_and_signed_in_ids(
    keyed: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    async with Tracker(KEY, endpoint=keyed.url) as tracker:
        tracker.track("anon_7f3a", "view", item_id="prod_7")
        tracker.track("anon_other", "view", item_id="prod_7")
        tracker.track("anon_7f3a", "add_to_cart", item_id="prod_7")
        tracker.identify("usr_51", previous_user_id="anon_7f3a")
        tracker.track("usr_51", "purchase", item_id="prod_7", context={"price": 89.9})
        tracker.track("anon_phone", "view", item_id="prod_3")  # the same person, later
        tracker.identify("usr_51", previous_user_id="anon_phone")
        tracker.track("usr_9", "view", item_id="prod_7")

    for who in ("anon_7f3a", "usr_51", "anon_phone"):
        data = await api(session, keyed, "timeline", user_id=who)
        assert data["user_id"] == who
        assert data["ids"] == ["anon_7f3a", "usr_51", "anon_phone"], who  # first seen first
        assert data["anonymous"] == ["anon_7f3a", "anon_phone"]
        assert [(link["previous_user_id"], link["user_id"]) for link in data["links"]] == [
            ("anon_7f3a", "usr_51"),
            ("anon_phone", "usr_51"),
        ]
        shown = [(i["event"]["user_id"], i["event"]["event_name"]) for i in data["events"]]
        assert shown == [
            ("anon_7f3a", "view"),
            ("anon_7f3a", "add_to_cart"),
            ("usr_51", "identify"),
            ("usr_51", "purchase"),
            ("anon_phone", "view"),
            ("usr_51", "identify"),
        ], who
    alone = await api(session, keyed, "timeline", user_id="usr_9")
    assert alone["ids"] == ["usr_9"] and alone["links"] == [] and alone["count"] == 1
    nobody = await api(session, keyed, "timeline", user_id="usr_unknown")
    assert nobody["ids"] == ["usr_unknown"] and nobody["events"] == []
    page = await api(session, keyed, "timeline", user_id="usr_51", limit=2)
    assert [i["event"]["event_name"] for i in page["events"]] == ["view", "identify"]
    assert page["more"] is True
    async with session.get(keyed.inspector.url + "inspector/api/timeline") as r:
        assert r.status == 400 and "user_id" in (await r.json())["error"]


async def test_export_gives_what_the_filters_select_as_csv_and_json(
    keyed: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    batch = [
        event("usr_a", item_id="prod_1", context={"price": 9.5}),
        event("=HYPERLINK(1)", item_id="-2+3"),  # a spreadsheet would take these for formulas
        event("usr_b", item_id="prod_1", session_id="s1"),
        event("usr_c", "identify", "system", previous_user_id="anon_1"),
    ]
    assert await post(session, keyed, batch) == 202
    base = keyed.inspector.url + "inspector/api/export"
    async with session.get(base, params={"format": "csv", "item_id": "prod_1"}) as r:
        assert r.status == 200 and r.content_type == "text/csv"
        assert r.headers["Content-Disposition"] == 'attachment; filename="lehnz-events.csv"'
        rows = list(csv.reader(io.StringIO(await r.text())))
    assert rows[0] == [
        "id", "time", "request", "user_id", "event_family", "event_name", "item_id",
        "session_id", "recommendation_id", "previous_user_id", "context",
    ]  # fmt: skip
    assert [row[0] for row in rows[1:]] == ["1", "3"]
    assert rows[1][2:] == [
        "1",
        "usr_a",
        "engagement",
        "view",
        "prod_1",
        "",
        "",
        "",
        '{"price":9.5}',
    ]
    assert rows[2][7] == "s1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", rows[1][1])
    async with session.get(base, params={"format": "csv", "q": "hyperlink"}) as r:
        (row,) = list(csv.reader(io.StringIO(await r.text())))[1:]
    assert (row[3], row[6]) == ("'=HYPERLINK(1)", "'-2+3")

    async with session.get(base, params={"format": "json", "user_id": "usr_b"}) as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert r.headers["Content-Disposition"] == 'attachment; filename="lehnz-events.json"'
        assert await r.json() == [batch[2]]  # the events as sent: they can be posted again
    async with session.get(base, params={"format": "json", "timeline": "anon_1"}) as r:
        assert await r.json() == [batch[3]]
    async with session.get(base, params={"format": "json", "before": "3"}) as r:
        assert await r.json() == batch[:2]
    async with session.get(base, params={"format": "xml"}) as r:
        assert r.status == 400


# -- security: the Host allow-list and key masking ----------------------------------------

INSPECTOR_PATHS = [
    ("GET", "/"),
    ("GET", "/inspector/app.js"),
    ("GET", "/inspector/style.css"),
    ("GET", "/inspector/stream"),
    ("GET", "/inspector/api/events"),
    ("GET", "/inspector/api/timeline?user_id=usr_1"),
    ("GET", "/inspector/api/export?format=csv"),
    ("GET", "/inspector/api/refused"),
    ("GET", "/inspector/api/counters"),
    ("POST", "/inspector/api/reset"),
]


async def test_the_inspector_answers_only_to_allowed_host_names(
    keyed: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    """DNS rebinding: a page of another site reaches the port under its own name."""
    assert await post(session, keyed, [event("usr_1")]) == 202
    port = keyed.port
    for host in (f"rebind.test:{port}", "evil.example", f"127.0.0.1.evil.example:{port}",
                 f"localhost.:{port}", "", f"[::2]:{port}"):  # fmt: skip
        for method, path in INSPECTOR_PATHS:
            async with session.request(method, keyed.base_url + path, headers={"Host": host}) as r:
                assert r.status == 403, (host, path)
                assert "not allowed" in (await r.json())["error"]
                assert b"usr_1" not in await r.read()
    assert len(keyed.events) == 1  # not reset

    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LocalHost",
                 "[::1]"):  # fmt: skip
        async with session.get(
            keyed.base_url + "/inspector/api/counters", headers={"Host": host}
        ) as r:
            assert r.status == 200, host

    # the SDKs' endpoints answer whatever the Host (proxies, containers, tunnels)
    for path, body in ((keyed.url, [event("usr_2")]), (keyed.recommend_url, {"user_id": "u"})):
        async with session.post(
            path, json=body, headers={"Host": "rebind.test", "X-API-KEY": KEY}
        ) as r:
            assert r.status in (200, 202), path


async def test_allow_hosts_adds_names(session: aiohttp.ClientSession) -> None:
    with pytest.raises(ValueError, match="not a host name"):
        ReferenceServer(allow_hosts=["box.lan/path"])
    async with ReferenceServer(allow_hosts=["Box.LAN", "fe80::1"]) as server:
        assert server.allow_hosts == frozenset({"box.lan", "[fe80::1]"})
        for host, status in (("box.lan:8080", 200), ("[fe80::1]:1", 200), ("box.lan2", 403)):
            async with session.get(
                server.base_url + "/inspector/api/counters", headers={"Host": host}
            ) as r:
                assert r.status == status, host


async def test_any_key_shaped_header_value_is_masked(
    keyed: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    secret = "lehnz_sk_L34kedS3cret"
    headers = {
        "X-Forwarded-Authorization": f"Bearer {secret}",
        "X-Upstream-Key": f"{KEY}, other",
        "Authorization": "Basic dXNlcjpwYXNz",
        "Idempotency-Key": KEY,
    }
    async with session.get(keyed.inspector.url + "inspector/stream") as stream:
        await keyed.wait_for(lambda: keyed.inspector.streams == 1)
        assert await post(session, keyed, [event("usr_1")], **headers) == 202
        with anyio.fail_after(TIMEOUT):
            _, message = await read_message(stream.content)
    live = msgspec.json.encode(message)
    async with session.get(keyed.inspector.url + "inspector/api/events") as r:
        shown = await r.read()
        (item,) = msgspec.json.decode(shown)["events"]
    for raw in (shown, live):
        assert secret.encode() not in raw and KEY.encode() not in raw
        assert b"dXNlcjpwYXNz" not in raw
    request = item["request"]
    assert request["headers"]["X-Forwarded-Authorization"] == "Bearer lehnz_sk_****"
    assert request["headers"]["X-Upstream-Key"] == "lehnz_pk_****, other"
    assert request["headers"]["Authorization"] == "****"
    assert request["idempotency_key"] == "lehnz_pk_****"


async def test_the_first_paint_shows_no_numbers_before_data(
    server: ReferenceServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(server.inspector.url) as r:
        page = await r.text()
    for name in ("events", "requests", "refused", "duplicates"):
        match = re.search(rf'id="counter-{name}">([^<]*)<', page)
        assert match and not re.search(r"\d", match[1]), name
    assert "keeps everything" not in page and "Loading" in page


# -- the public seams of ReferenceServer the inspector uses --------------------------------


async def test_reference_server_public_api_for_tools(
    keyed: ReferenceServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[tuple[int, str | None, int]] = []
    resets: list[bool] = []

    def broken(record: Any, events: Any) -> None:
        raise RuntimeError("a broken subscriber")

    unsubscribe = keyed.subscribe(
        lambda record, events: heard.append((record.status, record.message, len(events))),
        lambda: resets.append(True),
    )
    keyed.subscribe(broken)
    assert await post(session, keyed, [event("usr_1"), event("usr_2")]) == 202  # not broken
    assert await post(session, keyed, {"user_id": "x"}) == 400
    assert heard == [(202, None, 2), (400, "Missing mandatory fields", 0)]
    assert "a broken subscriber" in caplog.text
    (refused,) = keyed.refused
    assert refused.refused_event == {"user_id": "x"} and refused.batch_size == 1
    assert refused.body_size == len(b'{"user_id":"x"}')

    keyed.reset()
    assert resets == [True] and keyed.events == [] and keyed.refused == []
    assert (await api(session, keyed, "counters"))["resets"] == 1
    unsubscribe()
    assert await post(session, keyed, [event("usr_3")]) == 202
    assert len(heard) == 2


def test_the_inspector_does_not_import_testing() -> None:
    """No import circle: testing imports the inspector, never the other way round."""
    for name in ("_inspector.py", "_inspector_store.py", "_inspector_stream.py"):
        source = (README_DIR / "lehnz_async" / name).read_text()
        imports = re.findall(r"^\s*(?:from|import) .*$", source, re.M)
        assert not [line for line in imports if "testing" in line], name
    code = (
        "import sys, lehnz_async._inspector; "
        "assert 'lehnz_async.testing' not in sys.modules, 'testing was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=cli_env())
