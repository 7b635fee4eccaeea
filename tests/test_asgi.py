"""lehnz_async.asgi: the lifespan helper, get_tracker, anonymous ids, and the FastAPI example.

The example runs under uvicorn in a subprocess and is sent real HTTP requests; the
lifespan is driven directly with real Starlette objects. Every tracker delivers to the
reference server over loopback HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from yarl import URL

from lehnz_async import ConfigurationError, Tracker, TrackerClosedError
from lehnz_async.asgi import (
    ANONYMOUS_ID_COOKIE,
    STATE_KEY,
    AnonymousId,
    anonymous_id,
    get_tracker,
    lifespan,
)
from lehnz_async.testing import ReferenceServer

from .conftest import Errors, assert_ledger

MakeTracker = Callable[..., Tracker]

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0  # seconds for uvicorn to import the app and listen
SHUTDOWN_TIMEOUT = 30.0  # seconds from SIGTERM to exit (the flush is a single POST)
RUNNING = re.compile(rb"Uvicorn running on http://127\.0\.0\.1:(\d+)")
NEW_ID = re.compile(r"anon_[0-9a-f]{32}")


def make_request(app: Any, state: dict[str, Any] | None = None, cookie: str = "") -> Request:
    """A Starlette request as the router hands it to an endpoint."""
    scope: dict[str, Any] = {"type": "http", "app": app, "headers": []}
    if cookie:
        scope["headers"].append((b"cookie", cookie.encode("latin-1")))
    if state is not None:
        scope["state"] = dict(state)  # Starlette gives each request a copy
    return Request(scope)


# -- the FastAPI example under uvicorn ------------------------------------------------------


class Uvicorn:
    """A uvicorn process serving one app; its combined output is kept in `output`."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.output = bytearray()
        self.port = 0

    async def read_until_running(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.output += line
            if match := RUNNING.search(line):
                self.port = int(match[1])
                return
        raise AssertionError(f"uvicorn exited before serving:\n{self.output.decode()}")

    async def drain(self) -> None:
        """Keep reading, so that a full pipe never blocks the server's logging."""
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.output += line


@contextlib.asynccontextmanager
async def uvicorn(app: str, env: dict[str, str], app_dir: Path = ROOT) -> AsyncIterator[Uvicorn]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--app-dir",
        str(app_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-access-log",
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    server = Uvicorn(process)
    drain: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(server.read_until_running(), STARTUP_TIMEOUT)
        drain = asyncio.create_task(server.drain())
        yield server
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if drain is not None:
            await drain


async def visit(base_url: str, i: int) -> tuple[str, list[tuple[Any, ...]]]:
    """One visitor: browses anonymously, signs in, buys; returns their anonymous id and
    the events the shop should have tracked (see `summary`)."""
    product, other = f"prod_{i % 3 + 1}", f"prod_{(i + 1) % 3 + 1}"
    user = f"usr_{i}"
    jar = aiohttp.CookieJar(unsafe=True)  # unsafe: accept cookies from an IP address
    async with aiohttp.ClientSession(base_url, cookie_jar=jar) as http:

        async def call(method: str, path: str, **kwargs: Any) -> Any:
            async with http.request(method, path, **kwargs) as response:
                assert response.status == 200, await response.text()
                return await response.json()

        price = (await call("GET", f"/products/{product}"))["price"]  # async def endpoint
        anon = jar.filter_cookies(URL(base_url))[ANONYMOUS_ID_COOKIE].value
        await call("POST", f"/cart/{product}")  # def endpoint, same cookie
        assert await call("POST", "/login", json={"user_id": user}) == {"user_id": user}
        assert ANONYMOUS_ID_COOKIE not in jar.filter_cookies(URL(base_url))
        await call("GET", f"/products/{other}")
        await call("POST", f"/checkout/{product}")  # def endpoint
    return anon, [
        (anon, "view", "engagement", product, None, 0.0),
        (anon, "add_to_cart", "engagement", product, None, 0.0),
        (user, "identify", "system", None, anon, 0.0),
        (user, "view", "engagement", other, None, 0.0),
        (user, "purchase", "conversion", product, None, price),
    ]


def summary(event: dict[str, Any]) -> tuple[Any, ...]:
    """(user, name, family, item, previous user, price) of an event the server received."""
    return (
        event["user_id"],
        event["event_name"],
        event["event_family"],
        event.get("item_id"),
        event.get("previous_user_id"),
        event.get("context", {}).get("price", 0.0),
    )


@pytest.mark.anyio
@pytest.mark.skipif(sys.platform == "win32", reason="stops the server with SIGTERM")
async def test_the_fastapi_example_delivers_every_event_when_stopped_with_sigterm(
    server: ReferenceServer,
) -> None:
    visitors = 24
    env = {"LEHNZ_API_KEY": server.api_key, "LEHNZ_ENDPOINT": server.url}
    async with uvicorn("examples.fastapi_app:app", env) as app:
        base_url = f"http://127.0.0.1:{app.port}"
        with anyio.fail_after(30):
            results = await asyncio.gather(*(visit(base_url, i) for i in range(visitors)))
        app.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(app.process.wait(), SHUTDOWN_TIMEOUT)
    output = app.output.decode()
    # uvicorn shuts down gracefully, then re-raises the signal it caught (since 0.29)
    assert app.process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output, output
    # nothing but uvicorn's INFO lines: no warning, error or traceback, from uvicorn or
    # from lehnz_async (whose records reach stderr bare, through logging's last resort)
    assert [line for line in output.splitlines() if not line.startswith("INFO:")] == [], output

    anon_ids = [anon for anon, _ in results]
    assert all(NEW_ID.fullmatch(anon) for anon in anon_ids), anon_ids
    assert len(set(anon_ids)) == visitors
    expected = sorted(event for _, events in results for event in events)
    assert sorted(summary(event) for event in server.events) == expected


@pytest.mark.anyio
@pytest.mark.skipif(sys.platform == "win32", reason="stops the server with SIGTERM")
async def test_the_readme_fastapi_example_delivers_on_sigterm(
    server: ReferenceServer, tmp_path: Path
) -> None:
    from .test_readme import EXAMPLES

    (tmp_path / "readme_app.py").write_text(EXAMPLES["fastapi"])
    env = {"LEHNZ_API_KEY": server.api_key, "LEHNZ_ENDPOINT": server.url}
    async with uvicorn("readme_app:app", env, app_dir=tmp_path) as app:
        base_url = f"http://127.0.0.1:{app.port}"
        jar = aiohttp.CookieJar(unsafe=True)  # unsafe: keep cookies from an IP address
        async with aiohttp.ClientSession(cookie_jar=jar) as http:  # one visitor
            for _ in range(3):
                async with http.get(f"{base_url}/products/p1") as resp:
                    assert resp.status == 200
            async with http.post(f"{base_url}/cart/p1") as resp:  # a `def` endpoint
                assert resp.status == 200
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:  # a new browser, cart first
            for _ in range(2):
                async with http.post(f"{base_url}/cart/p2") as resp:
                    assert resp.status == 200
            assert "lehnz_anon_id" in {cookie.key for cookie in jar}
        app.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(app.process.wait(), SHUTDOWN_TIMEOUT)
    assert "Application shutdown complete" in app.output.decode()
    events = server.events
    assert [e["event_name"] for e in events] == ["view"] * 3 + ["add_to_cart"] * 3
    assert len({e["user_id"] for e in events[:4]}) == 1  # the cookie's anonymous id
    assert len({e["user_id"] for e in events[4:]}) == 1  # the new browser's, set at once
    assert events[4]["user_id"] != events[0]["user_id"]


# -- lifespan() -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_lifespan_wraps_an_app_lifespan_that_yields_state(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    made: list[Tracker] = []

    def factory() -> Tracker:
        made.append(make_tracker(flush_interval=3600))
        return made[-1]

    @contextlib.asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        tracker: Tracker = app.state.lehnz_tracker  # started before the app's own startup
        tracker.track("usr_startup", "view", item_id="prod_1")
        yield {"db": "connected"}
        assert not tracker.closed  # the app's own shutdown runs before the tracker closes
        tracker.track("usr_shutdown", "view", item_id="prod_1")

    app = Starlette()
    async with lifespan(factory, app_lifespan=app_lifespan)(app) as state:
        (tracker,) = made
        assert state == {"db": "connected", STATE_KEY: tracker}
        assert app.state.lehnz_tracker is tracker
        tracker.track("usr_request", "view", item_id="prod_1")
        assert server.events == []  # nothing is due before the shutdown flush
    assert tracker.closed
    assert [e["user_id"] for e in server.events] == ["usr_startup", "usr_request", "usr_shutdown"]
    assert errors == []
    assert_ledger(tracker.stats)


@pytest.mark.anyio
async def test_lifespan_wraps_an_app_lifespan_that_yields_nothing(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    seen: list[str] = []

    @contextlib.asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        seen.append("startup")
        yield
        seen.append("shutdown")

    tracker = make_tracker()
    async with lifespan(tracker, app_lifespan=app_lifespan)(Starlette()) as state:
        assert state == {STATE_KEY: tracker}
        assert seen == ["startup"]
        tracker.track("usr_1", "view", item_id="prod_1")
    assert seen == ["startup", "shutdown"]
    assert tracker.closed
    assert [e["user_id"] for e in server.events] == ["usr_1"]


@pytest.mark.anyio
async def test_a_tracker_given_as_such_serves_one_run_and_says_what_to_pass_for_more(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    tracker = make_tracker()
    tracker_lifespan = lifespan(tracker)
    app = Starlette()
    async with tracker_lifespan(app) as state:
        assert state == {STATE_KEY: tracker}
        tracker.track("usr_1", "view")
    assert tracker.closed
    assert len(server.events) == 1
    with pytest.raises(TrackerClosedError, match=r"lifespan\(Tracker\) or lifespan\(lambda"):
        async with tracker_lifespan(app):
            pass


@pytest.mark.anyio
async def test_a_factory_makes_a_tracker_each_time_the_app_starts(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    tracker_lifespan = lifespan(make_tracker)
    trackers = []
    for run in range(2):
        async with tracker_lifespan(Starlette()) as state:
            trackers.append(state[STATE_KEY])
            state[STATE_KEY].track(f"usr_{run}", "view")
    assert trackers[0] is not trackers[1]
    assert all(t.closed for t in trackers)
    assert sorted(e["user_id"] for e in server.events) == ["usr_0", "usr_1"]


@pytest.mark.anyio
async def test_a_failed_startup_still_flushes_and_closes_the_tracker(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    tracker = make_tracker(flush_interval=3600)

    @contextlib.asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.lehnz_tracker.track("usr_1", "view")
        raise RuntimeError("the database is down")
        yield  # pragma: no cover

    with pytest.raises(RuntimeError, match="database"):
        async with lifespan(tracker, app_lifespan=app_lifespan)(Starlette()):
            pass  # pragma: no cover
    assert tracker.closed
    assert [e["user_id"] for e in server.events] == ["usr_1"]


@pytest.mark.anyio
async def test_a_state_key_the_app_already_uses_is_refused(make_tracker: MakeTracker) -> None:
    @contextlib.asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {STATE_KEY: "the app's own"}

    tracker = make_tracker()
    with pytest.raises(ConfigurationError, match="state_key"):
        async with lifespan(tracker, app_lifespan=app_lifespan)(Starlette()):
            pass  # pragma: no cover
    assert tracker.closed


def test_lifespan_refuses_what_is_not_a_tracker() -> None:
    with pytest.raises(TypeError, match="a Tracker or a function returning one, not str"):
        lifespan("lehnz_pk_test")  # type: ignore[arg-type]


# -- get_tracker() ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_get_tracker_finds_the_tracker_in_the_request_state_or_on_the_app(
    make_tracker: MakeTracker,
) -> None:
    app = Starlette()
    tracker = make_tracker()
    async with lifespan(tracker)(app) as state:
        assert get_tracker(make_request(app, state)) is tracker
        # a server without lifespan state, or a mounted sub-app: one place is enough
        assert get_tracker(make_request(app)) is tracker
        assert get_tracker(make_request(Starlette(), state)) is tracker
        assert make_request(app, state).state.lehnz_tracker is tracker


def test_get_tracker_without_the_lifespan_says_how_to_install_it() -> None:
    with pytest.raises(
        ConfigurationError, match=r"lifespan=lehnz_async\.asgi\.lifespan\(Tracker\(\)\)"
    ):
        get_tracker(make_request(Starlette(), {}))


def test_get_tracker_declares_the_request_so_that_fastapi_injects_it() -> None:
    signature = inspect.signature(get_tracker)
    (parameter,) = signature.parameters.values()
    assert parameter.annotation is HTTPConnection  # FastAPI injects Request and WebSocket
    assert signature.return_annotation is Tracker


# -- anonymous_id() ---------------------------------------------------------------------


def test_anonymous_id_reads_the_cookie() -> None:
    request = make_request(Starlette(), cookie=f"{ANONYMOUS_ID_COOKIE}=anon_7f3; other=1")
    response = Response()
    assert anonymous_id(request, response) == AnonymousId("anon_7f3", is_new=False)
    assert "set-cookie" not in response.headers


def test_anonymous_id_makes_a_new_id_and_sets_the_cookie() -> None:
    response = Response()
    anon = anonymous_id(make_request(Starlette()), response)
    assert anon.is_new
    assert NEW_ID.fullmatch(anon.user_id)
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{ANONYMOUS_ID_COOKIE}={anon.user_id};")
    for attribute in ("HttpOnly", "Max-Age=31536000", "Path=/", "SameSite=lax"):
        assert attribute in cookie
    # without a response the caller sets the cookie; each new id is different
    again = anonymous_id(make_request(Starlette()))
    assert again.is_new and again.user_id != anon.user_id


def test_anonymous_id_uses_the_cookie_name_and_lifetime_given() -> None:
    request = make_request(Starlette(), cookie=f"{ANONYMOUS_ID_COOKIE}=anon_1")
    response = Response()
    anon = anonymous_id(request, response, cookie="visitor", max_age=60)
    assert anon.is_new
    assert response.headers["set-cookie"].startswith(f"visitor={anon.user_id};")
    assert "Max-Age=60" in response.headers["set-cookie"]


@pytest.mark.parametrize("value", ["", "x" * 129, "two words", "<script>", "../etc", "é"])
def test_anonymous_id_replaces_a_cookie_unfit_for_a_user_id(value: str) -> None:
    request = make_request(Starlette(), cookie=f"{ANONYMOUS_ID_COOKIE}={value}")
    anon = anonymous_id(request)
    assert anon.is_new
    assert NEW_ID.fullmatch(anon.user_id)
