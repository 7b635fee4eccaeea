"""Every Python block of the README runs in a test: those marked ``<!-- example: NAME -->``
as whole programs (tests/test_readme.py and the platform tests), the rest here, each in
the setting its text gives it (an app around a route, a server around a fragment), and
each checked for what it says it does."""

from __future__ import annotations

import asyncio
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from lehnz_async import Event, Tracker
from lehnz_async.testing import ReferenceServer, nginx_page

from .test_readme import EXAMPLES, README

BLOCKS = re.findall(r"(<!-- example: \S+ -->\n)?```python\n(.*?)```", README.read_text(), re.S)
#: The unmarked blocks' first lines, and the test that runs each.
DJANGO = "tests/integrations/test_django.py::test_the_readme_django_blocks"
UNMARKED = {
    '@app.post("/login")': "test_the_login_route_stitches_identity",
    "# settings.py": DJANGO,
    "# views.py": DJANGO,
    "# asgi.py: only for ASGI servers": DJANGO,
    "import msgspec": "test_before_send_scrubs_and_enriches",
    "from lehnz_async import Tracker": "test_the_otel_block_instruments_a_tracker",
    "import ssl": "test_the_proxy_and_tls_block_makes_its_trackers",
    'await server.outage("refuse", 2.0)': "test_the_outage_fragment_runs_against_a_server",
    '@app.get("/ready")': "test_the_readiness_route_answers_503_when_down",
}


def unmarked(first_line: str) -> str:
    for marker, code in BLOCKS:
        if not marker and code.startswith(first_line):
            return code
    raise KeyError(first_line)


def test_every_block_is_run_by_a_test() -> None:
    marked = [m for m, _ in BLOCKS if m]
    assert len(marked) == len(EXAMPLES)
    for marker, code in BLOCKS:
        if not marker:
            first = code.splitlines()[0]
            assert any(first.startswith(k) for k in UNMARKED), f"no test runs: {first!r}"
    assert len([1 for m, _ in BLOCKS if not m]) == len(UNMARKED)


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEHNZ_API_KEY", "lehnz_pk_readme")


def test_the_login_route_stitches_identity(key_env: None) -> None:
    namespace: dict[str, Any] = {}
    exec(EXAMPLES["fastapi"] + unmarked('@app.post("/login")'), namespace)
    routes = {getattr(r, "path", None) for r in namespace["app"].routes}
    assert {"/login", "/cart/{product_id}", "/products/{product_id}"} <= routes


@pytest.mark.anyio
async def test_before_send_scrubs_and_enriches(server: ReferenceServer, key_env: None) -> None:
    namespace: dict[str, Any] = {}
    exec(unmarked("import msgspec"), namespace)
    assert isinstance(namespace["tracker"], Tracker)
    scrub = namespace["scrub"]
    async with Tracker(server.api_key, endpoint=server.url, before_send=scrub) as tracker:
        tracker.track("test_bot", "view", item_id="p")
        tracker.track("usr_1", "view", item_id="p", context={"email": "a@b.c", "page": "home"})
    (sent,) = server.events
    assert sent["context"] == {"page": "home", "app_version": "2.3.1"}
    assert tracker.stats.drops == {"before_send": 1}
    assert isinstance(scrub(Event("u", "engagement", "view")), Event)


def test_the_otel_block_instruments_a_tracker(key_env: None) -> None:
    pytest.importorskip("opentelemetry")
    namespace: dict[str, Any] = {}
    exec(unmarked("from lehnz_async import Tracker"), namespace)
    assert isinstance(namespace["tracker"], Tracker)


def test_the_proxy_and_tls_block_makes_its_trackers(
    key_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trustme = pytest.importorskip("trustme")
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "corp-ca.pem"))
    monkeypatch.chdir(tmp_path)  # the block reads corp-ca.pem from where it runs
    namespace: dict[str, Any] = {}
    exec(unmarked("import ssl"), namespace)
    tracker = namespace["tracker"]
    assert isinstance(tracker, Tracker) and tracker._config.compression == "gzip"


@pytest.mark.anyio
async def test_the_outage_fragment_runs_against_a_server(server: ReferenceServer) -> None:
    """The fragment, inside an async function given ``server``, on real time: its
    two-second outage is waited out."""
    code = unmarked('await server.outage("refuse", 2.0)')
    namespace: dict[str, Any] = {}
    body = textwrap.indent(code, "    ")
    exec(f"async def fragment(server):\n{body}\n    return server.outages", namespace)
    outages = await asyncio.wait_for(namespace["fragment"](server), 10)
    assert [o.kind for o in outages] == ["refuse", "503"]
    assert all(o.end is not None for o in outages) and not server.is_down
    assert server.faults.proxy_body_limit == 64_000
    assert nginx_page(413).startswith(b"<html>")


@pytest.mark.anyio
async def test_the_readiness_route_answers_503_when_down(server: ReferenceServer) -> None:
    """The route as FastAPI calls it (with the Response it injects): 200 while the tracker
    delivers, 503 with the reason once it is down."""
    from fastapi import FastAPI, Response

    lehnz_tracker = Tracker(server.api_key, endpoint=server.url)
    namespace: dict[str, Any] = {
        "app": FastAPI(),
        "Response": Response,
        "lehnz_tracker": lehnz_tracker,
    }
    exec(unmarked('@app.get("/ready")'), namespace)
    ok = Response()
    body = await namespace["ready"](ok)
    assert ok.status_code == 200 and body["status"] == "ok"
    await lehnz_tracker.aclose()
    down = Response()
    body = await namespace["ready"](down)
    assert down.status_code == 503 and body["reason"] == "the tracker is closed"
