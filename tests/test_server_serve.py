"""``lehnz-async serve`` as a server people run: memory stays bounded under a stream of
large requests, and 1,000 concurrent connections are all answered. Real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anyio
import msgspec
import pytest

from .test_cli import cli_env, run_cli

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; SIGSTOP"),
]

TIMEOUT = 60.0
KEY = "lehnz_pk_test"


class Serve:
    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url
        match = re.fullmatch(r"http://([\d.]+):(\d+)/api/v1/events/ingest", url)
        assert match
        self.host, self.port = match[1], int(match[2])

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.M)
        assert match, status
        return int(match[1])


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, *args: str) -> AsyncIterator[Serve]:
    """``lehnz-async serve --port 0 *args`` in a subprocess; its log goes to a file (a pipe
    nobody reads would fill up and stop it)."""
    with (tmp_path / "serve.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lehnz_async",
            "serve",
            "--port",
            "0",
            *args,
            stdout=subprocess.PIPE,
            stderr=log,
            env=cli_env(),
        )
    assert proc.stdout is not None
    try:
        with anyio.fail_after(TIMEOUT):
            line = (await proc.stdout.readline()).decode()
        match = re.fullmatch(r"listening on (\S+)\n", line)
        assert match, line
        yield Serve(proc, match[1])
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(TIMEOUT):
            code = await proc.wait()
        log_text = (tmp_path / "serve.log").read_text()
        assert "Traceback" not in log_text, log_text[-3000:]
        assert code == 0, log_text[-3000:]


def somaxconn() -> int:
    """The kernel's cap on a listen backlog."""
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def big_body(size: int) -> bytes:
    """A JSON array of distinct events, about ``size`` bytes."""
    one = len(msgspec.json.encode(event(0))) + 1
    return msgspec.json.encode([event(i) for i in range(size // one)])


def event(i: int) -> dict[str, object]:
    return {
        "user_id": f"usr_{i:07d}",
        "event_family": "engagement",
        "event_name": "view",
        "item_id": f"prod_{i % 5000:05d}",
        "context": {"page": "product", "position": i % 12},
    }


async def test_serve_memory_stays_bounded(tmp_path: Path) -> None:
    body = big_body(900_000)
    assert 880_000 < len(body) < 920_000
    async with (
        serve(tmp_path) as server,
        aiohttp.ClientSession(headers={"X-API-KEY": KEY}) as http,
    ):

        async def send(n: int) -> None:
            for _ in range(n):
                async with http.post(server.url, data=body) as resp:
                    assert resp.status == 202, await resp.text()

        await asyncio.gather(*(send(5) for _ in range(4)))  # warm up: 20 requests
        before = server.rss_kb()
        await asyncio.gather(*(send(50) for _ in range(4)))  # 200 requests, 180 MB
        after = server.rss_kb()
    # 200 requests carried 1.4 M events; the server holds the last 10,000
    assert after - before < 50_000, (before, after)


async def test_serve_answers_1000_concurrent_connections(tmp_path: Path) -> None:
    if somaxconn() < 1024:
        pytest.skip("net.core.somaxconn caps the listen backlog below 1,000")
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 2048 <= hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    n = 1000
    body = msgspec.json.encode([event(0)])
    request = (
        b"POST /api/v1/events/ingest HTTP/1.1\r\nHost: x\r\nX-API-KEY: lehnz_pk_test\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    async with serve(tmp_path) as server:
        # The server is stopped: only the kernel's accept queue (the listen backlog) can
        # complete these connections. With aiohttp's default backlog (128) the rest would
        # wait for SYN retransmits, and never complete while the server is stopped.
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with anyio.fail_after(30):
                streams = await asyncio.gather(
                    *(asyncio.open_connection(server.host, server.port) for _ in range(n))
                )
            for _, writer in streams:
                writer.write(request)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            try:
                return await reader.readline()
            finally:
                writer.close()

        with anyio.fail_after(TIMEOUT):
            lines = await asyncio.gather(*(answer(r, w) for r, w in streams))
    assert lines == [b"HTTP/1.1 202 Accepted\r\n"] * n


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep", "0"], "--keep: must be a positive integer"),
        (["--client-timeout", "0"], "--client-timeout: must be a positive number"),
        (["--client-timeout", "nan"], "--client-timeout: must be a positive number"),
    ],
)
async def test_serve_options_are_checked(args: list[str], message: str) -> None:
    code, _, err = await run_cli("serve", "--port", "0", *args)
    assert code == 2 and message in err, err
