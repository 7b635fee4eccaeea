"""lehnz_async.aws_lambda, driven as Lambda drives it.

The function (`lambda_app.py`) runs under the real runtime interface client,
``python -m awslambdaric``, in its own process, against a Lambda Runtime API that this
test serves on loopback (``/2018-06-01/runtime/invocation/next``, ``/response``,
``/error``, ``/init/error``, with ``Lambda-Runtime-Deadline-Ms`` and the other headers
Lambda sends). As Lambda does, the test freezes the process (SIGSTOP) while it waits for
its next invocation, here for longer than the ingestion server keeps an idle keep-alive
connection open, and thaws it (SIGCONT) to hand it the next one. Every event must reach
the reference server once, and every answer must arrive before its invocation's deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lehnz_async.testing import ReferenceServer

pytest.importorskip("awslambdaric", reason="pip install awslambdaric (the test extra has it)")

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="freezes the function with SIGSTOP"),
]

HERE = Path(__file__).resolve().parent
KEEPALIVE = 0.5  # seconds the ingestion server keeps an idle connection open
FREEZE = 1.0  # seconds the function is frozen between invocations (> KEEPALIVE)
TIMEOUT = 3.0  # the function's timeout: each invocation's deadline is this far away
WAIT = 30.0  # most seconds the test waits for anything


@dataclass
class Invocation:
    request_id: str
    event: dict[str, Any]
    timeout: float
    answered: asyncio.Future[tuple[str, float, Any]] = field(repr=False)
    deadline_ms: int = 0  # set when the function receives it, as Lambda does


class RuntimeAPI:
    """The Lambda Runtime API, the service side: hands out invocations, takes answers,
    and freezes the function while it waits for the next one, as Lambda does."""

    def __init__(self) -> None:
        self.pending: asyncio.Queue[Invocation] = asyncio.Queue()
        self.by_id: dict[str, Invocation] = {}
        self.pid = 0
        self.served = 0
        self.frozen: list[float] = []  # how long each freeze lasted
        self.init_errors: list[Any] = []
        app = web.Application()
        app.router.add_get("/2018-06-01/runtime/invocation/next", self._next)
        app.router.add_post("/2018-06-01/runtime/invocation/{id}/response", self._response)
        app.router.add_post("/2018-06-01/runtime/invocation/{id}/error", self._error)
        app.router.add_post("/2018-06-01/runtime/init/error", self._init_error)
        self.app = app

    async def invoke(
        self, event: dict[str, Any], timeout: float = TIMEOUT, expect: str = "response"
    ) -> tuple[Any, float]:
        """Hand the function one invocation; its answer (``/response`` or, with
        ``expect="error"``, ``/error``) and the seconds it arrived before the deadline
        (negative: an overrun)."""
        loop = asyncio.get_running_loop()
        invocation = Invocation(str(uuid.uuid4()), event, timeout, loop.create_future())
        self.by_id[invocation.request_id] = invocation
        await self.pending.put(invocation)
        kind, answered_at, body = await asyncio.wait_for(invocation.answered, WAIT)
        assert kind == expect, (kind, body)
        return body, invocation.deadline_ms / 1000 - answered_at

    async def _next(self, request: web.Request) -> web.Response:
        if self.served and self.pid:
            # the function asked for its next invocation: Lambda freezes it here
            start = time.monotonic()
            with contextlib.suppress(ProcessLookupError):  # retired meanwhile
                os.kill(self.pid, signal.SIGSTOP)
                await asyncio.sleep(FREEZE)  # the freeze itself, not a wait for an event
                os.kill(self.pid, signal.SIGCONT)
                self.frozen.append(time.monotonic() - start)
        invocation = await self.pending.get()
        invocation.deadline_ms = int((time.time() + invocation.timeout) * 1000)
        self.served += 1
        return web.Response(
            body=json.dumps(invocation.event).encode(),
            content_type="application/json",
            headers={
                "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                "Lambda-Runtime-Deadline-Ms": str(invocation.deadline_ms),
                "Lambda-Runtime-Invoked-Function-Arn": (
                    "arn:aws:lambda:eu-west-1:123456789012:function:lehnz-test"
                ),
                "Lambda-Runtime-Trace-Id": f"Root=1-{uuid.uuid4().hex[:8]}-{uuid.uuid4().hex[:24]}",
            },
        )

    async def _answer(self, request: web.Request, kind: str) -> web.Response:
        answered_at = time.time()
        body = await request.json()
        invocation = self.by_id[request.match_info["id"]]
        if not invocation.answered.done():
            invocation.answered.set_result((kind, answered_at, body))
        return web.json_response({"status": "OK"}, status=202)

    async def _response(self, request: web.Request) -> web.Response:
        return await self._answer(request, "response")

    async def _error(self, request: web.Request) -> web.Response:
        return await self._answer(request, "error")

    async def _init_error(self, request: web.Request) -> web.Response:
        self.init_errors.append(await request.json())
        return web.json_response({"status": "OK"}, status=202)


class Relay:
    """A TCP relay in front of the ingestion server that counts connections: how many the
    function opened, and how many the server closed (the keep-alive timeout)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.opened = 0
        self.closed_by_server = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, from_server: bool
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
                if from_server:
                    self.closed_by_server += 1
            sink.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))


@contextlib.asynccontextmanager
async def lambda_function(
    runtime: RuntimeAPI, env: dict[str, str]
) -> AsyncIterator[asyncio.subprocess.Process]:
    """The runtime API on a loopback port, and the function under awslambdaric."""
    # shutdown_timeout: the function's last /next stays pending; do not wait for it
    runner = web.AppRunner(runtime.app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "awslambdaric",
        "lambda_app.handler",
        cwd=HERE,
        env={
            **os.environ,
            "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{port}",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            "AWS_LAMBDA_FUNCTION_NAME": "lehnz-test",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128",
            **env,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    runtime.pid = process.pid
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)
            process.kill()  # Lambda ends an environment without notice
        await process.wait()
        await runner.cleanup()


def events_for(invocation: int, n: int) -> list[dict[str, str]]:
    return [{"user": f"usr_{invocation}_{i}", "item": f"prod_{i % 7}"} for i in range(n)]


async def test_every_event_arrives_once_across_freezes_and_a_deadline_spool(
    tmp_path: Path,
) -> None:
    async with (
        ReferenceServer(client_timeout=KEEPALIVE) as server,
        Relay(server.port) as relay,
    ):
        runtime = RuntimeAPI()
        env = {
            "LEHNZ_API_KEY": server.api_key,
            "LEHNZ_ENDPOINT": server.url.replace(f":{server.port}/", f":{relay.port}/"),
            "LEHNZ_SPOOL_PATH": str(tmp_path / "spool.sqlite"),
        }
        sent: list[dict[str, str]] = []
        answers: list[dict[str, Any]] = []
        slack: list[float] = []
        connections: list[tuple[int, int]] = []  # (opened, closed by the server) before each
        async with lambda_function(runtime, env) as process:
            plan = [
                (120, TIMEOUT, 0.0),  # cold start
                (200, TIMEOUT, 0.0),  # after a freeze: the server closed the connection
                (150, TIMEOUT, 0.0),
                (80, 1.2, 2.5),  # the server is slower than the deadline: spooled
                (100, TIMEOUT, 0.0),  # a new tracker re-sends the spool, then its own
                (60, TIMEOUT, 0.0),
                (40, TIMEOUT, 0.0),  # the handler raises after tracking: still flushed
                (30, TIMEOUT, 0.0),
            ]
            for k, (n, timeout, latency) in enumerate(plan):
                server.faults.latency = latency
                connections.append((relay.opened, relay.closed_by_server))
                events = events_for(k, n)
                sent += events
                fail = k == len(plan) - 2
                body, left = await runtime.invoke(
                    {"events": events, "raise": fail}, timeout, "error" if fail else "response"
                )
                if fail:
                    assert body["errorType"] == "RuntimeError", body
                    continue
                answers.append(body)
                slack.append(left)
            server.faults.latency = 0.0
            assert process.returncode is None  # alive until Lambda retires it
        output = (await process.stdout.read()).decode() if process.stdout else ""  # type: ignore[union-attr]

        expected = collections.Counter(e["user"] for e in sent)
        with contextlib.suppress(TimeoutError):
            await server.wait_for(lambda: len(server.events) >= len(sent), timeout=5.0)
        arrived = collections.Counter(e["user_id"] for e in server.events)
        report = {
            "tracked": len(sent),
            "delivered": len(server.events),
            "duplicates_refused": sum(r.duplicate for r in server.requests),
            "slack_s": [round(s, 3) for s in slack],
            "frozen_s": [round(f, 3) for f in runtime.frozen],
            "stats": [a["stats"] for a in answers],
            "connections_opened": relay.opened,
            "closed_by_server": relay.closed_by_server,
            "connections_before_each": connections,
        }
        print("lambda report", json.dumps(report))
        assert arrived == expected, (report, output)
        assert all(left > 0 for left in slack), (report, output)  # no deadline overrun
        assert len({a["pid"] for a in answers}) == 1  # one warm environment throughout
        assert answers[-1]["stats"]["tracked"] >= 60 + 40  # the same tracker after the error
        # the slow server outlasted invocation 3's budget: its tracker spooled and closed,
        # invocation 4 began with a new one that re-sent the spool (all events arrived)
        assert answers[4]["stats"]["tracked"] == 0, report
        assert slack[3] < slack[2] - 1.0, report
        assert len(runtime.frozen) >= len(plan) - 1
        # each freeze outlasted the server's keep-alive: it closed the idle connection
        # meanwhile, the first request after the thaw went on a new one, and the tracker
        # neither retried nor counted an outage
        for before, after in itertools.pairwise(connections[1:4]):
            assert after[1] > before[1], report  # closed by the server while frozen
            assert after[0] > before[0], report  # a new connection after the thaw
        assert all(a["stats"]["outages"] == 0 for a in answers), report
        assert all(a["stats"]["retries"] == 0 for a in answers), report
        assert runtime.init_errors == []
        # the one traceback is the handler's own error, reported to Lambda
        assert output.count("Traceback") == 1, output
        assert "RuntimeError: the handler failed after tracking" in output, output
