"""Running real servers and workers for the integration tests: a subprocess whose output
is read as it comes (to wait for a line), stopped with a signal and timed; a loopback
port; HTTP load; and a check that every event arrived exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from lehnz_async.testing import ReferenceServer

ROOT = Path(__file__).resolve().parents[2]
APPS = Path(__file__).resolve().parent / "apps"
STARTUP_TIMEOUT = 30.0  # seconds for a server or worker to import its app and listen


class Proc:
    """A subprocess; its combined output is kept in `output`, read as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.output = bytearray()
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.output += line
            self._changed.set()
        self._changed.set()

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    async def wait_for(self, pattern: str, count: int = 1, timeout: float = STARTUP_TIMEOUT) -> str:
        """Wait until ``pattern`` occurs ``count`` times in the output; its last match."""
        regex = re.compile(pattern)
        with anyio.fail_after(timeout):
            while True:
                found = regex.findall(self.text)
                if len(found) >= count:
                    return str(found[count - 1])
                if self._reader.done():
                    raise AssertionError(f"exited before {pattern!r}:\n{self.text}")
                self._changed.clear()
                await self._changed.wait()
        raise AssertionError("unreachable")  # pragma: no cover

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> float:
        """Send ``sig`` and wait for the process to end; the seconds that took."""
        began = time.monotonic()
        self.process.send_signal(sig)
        await asyncio.wait_for(self.process.wait(), timeout)
        took = time.monotonic() - began
        await self._reader
        return took


@contextlib.asynccontextmanager
async def spawn(
    *args: str, program: str = sys.executable, cwd: Path = APPS, env: dict[str, str] | None = None
) -> AsyncIterator[Proc]:
    """Run ``program *args`` (Python by default) in ``cwd``, in a session of its own;
    killed with its whole group at the end if it is still running."""
    environ = {**os.environ, "PYTHONPATH": f"{APPS}{os.pathsep}{ROOT}", **(env or {})}
    process = await asyncio.create_subprocess_exec(
        program,
        *args,
        cwd=cwd,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # a signal to the test's group does not reach it
    )
    proc = Proc(process)
    try:
        yield proc
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        await proc._reader


def needs(module: str) -> pytest.MarkDecorator:
    """Skip unless ``module`` (a server run in a subprocess) is installed."""
    missing = importlib.util.find_spec(module) is None
    return pytest.mark.skipif(missing, reason=f"{module} is not installed (the test extra has it)")


def gunicorn_args(app: str, *options: str) -> tuple[str, ...]:
    """The arguments to run gunicorn serving ``app`` on a free loopback port. Without
    the control socket that gunicorn 24+ opens in ``~/.gunicorn`` (one path for every
    gunicorn of the machine)."""
    import gunicorn.config

    names = {setting.name for setting in gunicorn.config.KNOWN_SETTINGS}
    no_control = ["--no-control-socket"] if "control_socket_disable" in names else []
    return ("-m", "gunicorn", app, "--bind", "127.0.0.1:0", *no_control, *options)


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tracker_env(server: ReferenceServer) -> dict[str, str]:
    return {"LEHNZ_API_KEY": server.api_key, "LEHNZ_ENDPOINT": server.url}


async def get_all(base_url: str, paths: Iterable[str], concurrency: int = 8) -> None:
    """GET each path once (``concurrency`` at a time, a new connection each: servers that
    recycle workers close kept-alive ones); every answer must be 200."""
    queue = list(paths)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(base_url, connector=connector) as http:

        async def client() -> None:
            while queue:
                path = queue.pop()
                async with http.get(path) as response:
                    assert response.status == 200, (path, await response.text())

        await asyncio.gather(*(client() for _ in range(concurrency)))


def assert_once(server: ReferenceServer, expected: Iterable[str]) -> None:
    """The server holds exactly one event for each expected ``item_id``, and no other."""
    items = sorted(str(event.get("item_id")) for event in server.events)
    wanted = sorted(expected)
    if items != wanted:
        missing = sorted(set(wanted) - set(items))
        extra = sorted(set(items) - set(wanted))
        doubled = len(items) - len(set(items))
        raise AssertionError(
            f"{len(items)} events for {len(wanted)} expected: {len(missing)} missing "
            f"{missing[:10]}, {len(extra)} unexpected {extra[:10]}, {doubled} twice"
        )


def report(name: str, **figures: Any) -> None:
    """One line of the figures the issue asks for (shown with ``pytest -s`` or ``-rP``)."""
    print(
        f"[{name}] "
        + ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
        )
    )


#: Debian's redis-server (CI installs it), for the Celery broker and the stream worker.
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
needs_redis_server = pytest.mark.skipif(
    shutil.which(REDIS_SERVER) is None, reason="no redis-server: apt-get install redis-server"
)


@contextlib.asynccontextmanager
async def redis_server(directory: Path) -> AsyncIterator[str]:
    """A Redis server of its own on a free loopback port, no persistence, working in
    ``directory``; its URL, and it is stopped afterwards."""
    port = free_port()
    async with spawn(
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(directory), program=REDIS_SERVER,
    ) as proc:  # fmt: skip
        await proc.wait_for("Ready to accept connections")
        yield f"redis://127.0.0.1:{port}/0"
        await proc.stop(signal.SIGTERM, timeout=10)
