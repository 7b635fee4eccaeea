"""Real networks: a forward proxy (proxy.py) on loopback, TLS with a private CA
(trustme), gzip bodies; all against the reference server."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lehnz_async import ConfigurationError, DeliveryError, Tracker
from lehnz_async.testing import ReferenceServer

from .conftest import FAST_RETRY, Errors, track_many, user_ids

pytestmark = pytest.mark.anyio


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """proxy.py, a real forward proxy, on an ephemeral loopback port: (URL, its log)."""
    if shutil.which("proxy", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("proxy.py is not installed: pip install -e '.[test]'")
    port_file, log = tmp_path / "port", tmp_path / "proxy.log"
    proc = await asyncio.create_subprocess_exec(
        os.path.join(os.path.dirname(sys.executable), "proxy"),
        "--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
        "--log-level", "INFO", "--log-file", str(log), "--num-workers", "1",
        "--num-acceptors", "1",
    )  # fmt: skip
    try:
        for _ in range(200):  # proxy.py writes its port once it listens
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("proxy.py did not start")
        yield f"http://127.0.0.1:{port_file.read_text().strip()}", log
    finally:
        proc.terminate()
        await proc.wait()


def proxied_posts(log: Path, server: ReferenceServer) -> int:
    """POSTs to the server that the proxy's access log shows."""
    target = f"127.0.0.1:{server.port}"
    return sum(1 for line in log.read_text().splitlines() if "POST" in line and target in line)


async def logged_posts(log: Path, server: ReferenceServer, expected: int) -> int:
    """The proxy's count of POSTs, once it reaches ``expected`` (proxy.py writes its
    access log after each exchange, in another process) or after 5 s."""
    for _ in range(250):
        if (n := proxied_posts(log, server)) >= expected:
            return n
        await asyncio.sleep(0.02)
    return proxied_posts(log, server)


async def test_an_explicit_proxy_carries_every_request(
    server: ReferenceServer, proxy: tuple[str, Path], errors: Errors
) -> None:
    url, log = proxy
    tracker = Tracker(
        server.api_key, endpoint=server.url, proxy=url, max_batch_size=10, on_error=errors
    )
    async with tracker:
        track_many(tracker, 30)
    assert len(server.events) == 30 and errors == []
    assert await logged_posts(log, server, 3) == len(server.requests) == 3


async def test_http_proxy_from_the_environment_is_honoured(
    server: ReferenceServer, proxy: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, log = proxy
    monkeypatch.setenv("HTTP_PROXY", url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with Tracker(server.api_key, endpoint=server.url, max_batch_size=10) as tracker:
        track_many(tracker, 20)
    assert await logged_posts(log, server, 2) == 2 and len(server.events) == 20
    async with Tracker(server.api_key, endpoint=server.url, trust_env=False) as tracker:
        track_many(tracker, 5)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with Tracker(server.api_key, endpoint=server.url) as tracker:
        track_many(tracker, 5)
    assert len(server.events) == 30 and len(server.requests) == 4
    # the proxy marks what it forwards with a Via header: the last two went direct
    assert ["Via" in r.headers for r in server.requests] == [True, True, False, False]


async def test_gzip_bodies_round_trip(server: ReferenceServer, errors: Errors) -> None:
    tracker = Tracker(
        server.api_key, endpoint=server.url, compression="gzip", max_batch_size=50, on_error=errors
    )
    async with tracker:
        track_many(tracker, 200, context={"page": "home" * 20})
    assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(200))
    assert all(r.headers.get("Content-Encoding") == "gzip" for r in server.requests)
    assert all(r.body[:2] == b"\x1f\x8b" for r in server.requests)  # gzip's magic
    assert errors == []


def test_network_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="compression"):
        Tracker("lehnz_pk_x", compression="br")
    with pytest.raises(ConfigurationError, match="proxy"):
        Tracker("lehnz_pk_x", proxy="socks5://127.0.0.1:1080")
    with pytest.raises(ConfigurationError, match="ssl"):
        Tracker("lehnz_pk_x", ssl=True)  # type: ignore[arg-type]
    assert Tracker("lehnz_pk_x", ssl=ssl.create_default_context())._config.ssl is not None
    _ = (DeliveryError, FAST_RETRY)


@pytest.fixture
async def tls_server() -> AsyncIterator[tuple[ReferenceServer, ssl.SSLContext]]:
    """The reference server over HTTPS with a certificate from a private CA (trustme);
    and a client context that trusts that CA."""
    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with ReferenceServer(ssl_context=server_context) as server:
        yield server, client_context


async def test_tls_with_a_private_ca_through_ssl(
    tls_server: tuple[ReferenceServer, ssl.SSLContext], errors: Errors
) -> None:
    server, client_context = tls_server
    assert server.url.startswith("https://")
    tracker = Tracker(server.api_key, endpoint=server.url, ssl=client_context, on_error=errors)
    async with tracker:
        track_many(tracker, 25)
    assert len(server.events) == 25 and errors == []


async def test_a_certificate_that_does_not_verify_fails_loudly_once_and_is_not_retried(
    tls_server: tuple[ReferenceServer, ssl.SSLContext],
    errors: Errors,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    server, _ = tls_server
    tracker = Tracker(server.api_key, endpoint=server.url, max_batch_size=10, on_error=errors)
    with caplog.at_level(logging.DEBUG, "lehnz_async"):
        async with tracker:  # the system's CAs do not know the private one
            track_many(tracker, 30)
    stats = tracker.stats
    assert (stats.failed, stats.delivered, stats.requests, stats.retries) == (30, 0, 3, 0)
    assert stats.outages == 0 and server.requests == []
    assert len(errors) == 3 and all("does not verify" in str(e) for e in errors)
    assert {type(e.__cause__).__name__ for e in errors} == {"ClientConnectorCertificateError"}
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(loud) == 1 and "does not verify" in loud[0].getMessage()
