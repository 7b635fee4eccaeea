"""gevent with monkey patching: `flush_sync()`, `close()` and the exit hook from greenlets.

Where gevent has patched ``threading``, the tracker runs its loop in a real OS thread and
a greenlet that waits for it lets the hub run (``lehnz_async/_gevent.py``). Two real runs,
each in its own processes, against the reference server on loopback:

- a monkey-patched program that calls ``flush_sync()`` and ``close()`` from greenlets
  and from the main greenlet, and leaves a third tracker to the exit hook, while a probe
  greenlet measures the hub's lag (`gevent_greenlets.py`);
- a Flask app with a module-level tracker under ``gunicorn -k gevent -w 2``, sent
  requests, then stopped with SIGTERM; each worker's exit hook sends what it holds
  (`gevent_flask_app.py`), with gevent's monitor thread watching the hub.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lehnz_async.testing import ReferenceServer

from ..conftest import run_process

pytest.importorskip("gevent", reason="pip install gevent (the test extra has it)")

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="stops gunicorn with SIGTERM"),
]

HERE = Path(__file__).resolve().parent
WAIT = 30.0  # most seconds for any one step
LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+) \((\d+)\)")
BOOTING = re.compile(r"Booting worker with pid: (\d+)")
WORKER_REPORT = re.compile(r"^lehnz-worker (\{.*\})$", re.MULTILINE)


async def test_flush_sync_close_and_the_exit_hook_work_from_greenlets(
    server: ReferenceServer, tmp_path: Path
) -> None:
    events = 2950  # a tracker: 5 full batches of 500, and 450 that wait for the call
    code, out, err = await run_process(
        str(HERE / "gevent_greenlets.py"),
        server.url,
        server.api_key,
        str(events),
        str(tmp_path),
        timeout=WAIT,
    )
    assert code == 0, err
    assert "Error" not in err and "Traceback" not in err, err
    report = json.loads(out)
    print("gevent greenlets report", json.dumps(report))
    for call in ("flush_sync", "close"):
        assert report[call]["tracked"] == report[call]["delivered"] == events, report
        assert report[call]["probe_ticks"] > 0 or report[call]["seconds"] < 0.005, report
    assert report["main_close"] == {"closed": True}
    # the exit hook delivered the third tracker's events before the process ended
    users = collections.Counter(e["user_id"] for e in server.events)
    assert len(users) == 3 * events and set(users.values()) == {1}
    assert {u.split("_")[0] for u in users} >= {"flush", "close", "exit"}


async def read_lines(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode(errors="replace"))


async def wait_for_line(lines: list[str], pattern: re.Pattern[str], count: int = 1) -> list[Any]:
    """Poll the lines read so far until ``pattern`` matched ``count`` of them."""
    deadline = time.monotonic() + WAIT
    while True:
        found = [m for line in list(lines) if (m := pattern.search(line))]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern.pattern!r} in:\n{''.join(lines)}")
        await asyncio.sleep(0.02)


async def test_gunicorn_gevent_workers_deliver_every_event_on_sigterm(
    server: ReferenceServer, tmp_path: Path
) -> None:
    pytest.importorskip("gunicorn", reason="pip install gunicorn (the test extra has it)")
    pytest.importorskip("flask", reason="pip install flask (the test extra has it)")
    import gunicorn.config

    requests = 1500
    options = ["-k", "gevent", "-w", "2", "-b", "127.0.0.1:0", "--graceful-timeout", "20"]
    if any(s.name == "control_socket_disable" for s in gunicorn.config.KNOWN_SETTINGS):
        options.append("--no-control-socket")  # gunicorn 25+: no shared socket in $HOME
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gunicorn",
        *options,
        "gevent_flask_app:app",
        cwd=HERE,
        env={
            **os.environ,
            "LEHNZ_API_KEY": server.api_key,
            "LEHNZ_ENDPOINT": server.url,
            # a minute: most events wait in the queue until the exit hook sends them
            "APP_FLUSH_INTERVAL": "60",
            "GEVENT_MONITOR_THREAD_ENABLE": "true",
            "GEVENT_MAX_BLOCKING_TIME": "0.1",
            "PYTHONWARNINGS": "ignore::UserWarning",  # gevent's monitor: psutil missing
        },
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []
    assert process.stderr is not None
    reader = asyncio.create_task(read_lines(process.stderr, lines))
    try:
        (listening,) = await wait_for_line(lines, LISTENING)
        await wait_for_line(lines, BOOTING, 2)
        base = f"http://127.0.0.1:{listening[1]}"

        async with aiohttp.ClientSession() as session:
            gate = asyncio.Semaphore(16)

            async def visit(i: int) -> None:
                async with gate, session.get(f"{base}/view/p{i % 5}?user=g_{i}") as response:
                    assert response.status == 200, await response.text()

            await asyncio.wait_for(asyncio.gather(*(visit(i) for i in range(requests))), WAIT)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), WAIT)
        shutdown = time.monotonic() - start
        await reader
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        reader.cancel()
    output = "".join(lines)
    assert process.returncode == 0, output
    workers = [json.loads(m[1]) for m in WORKER_REPORT.finditer(output)]
    report = {
        "requests": requests,
        "delivered": len(server.events),
        "shutdown_s": round(shutdown, 3),
        "workers": workers,
    }
    print("gunicorn gevent report", json.dumps(report))
    assert len(workers) == 2, output
    assert sum(w["tracked"] for w in workers) == requests, report
    assert all(w["tracked"] == w["delivered"] for w in workers), report
    assert all(w["failed"] == w["dropped"] == 0 for w in workers), report
    assert "BlockingCallError" not in output and "Traceback" not in output, output
    users = collections.Counter(e["user_id"] for e in server.events)
    assert users == collections.Counter(f"g_{i}" for i in range(requests)), report
