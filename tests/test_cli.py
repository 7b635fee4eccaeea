"""The ``lehnz-async`` command line, run for real in subprocesses."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import anyio
import msgspec
import pytest

from lehnz_async import __version__
from lehnz_async.testing import ReferenceServer

from .conftest import run_process

TIMEOUT = 60.0  # bound of every wait on a subprocess


def cli_env(**overrides: str) -> dict[str, str]:
    """The environment of a CLI subprocess: no key or endpoint inherited from the shell."""
    env = {k: v for k, v in os.environ.items() if k not in ("LEHNZ_API_KEY", "LEHNZ_ENDPOINT")}
    env.update(overrides)
    return env


async def run_cli(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run ``python -m lehnz_async *args`` without blocking the loop (a server may run on it)."""
    return await run_process(
        "-m", "lehnz_async", *args, stdin=stdin, env=env if env is not None else cli_env()
    )


def jsonl(*lines: object) -> bytes:
    """JSON lines; a str is written as it is (for malformed and blank lines)."""
    return b"".join(
        (line.encode() if isinstance(line, str) else msgspec.json.encode(line)) + b"\n"
        for line in lines
    )


GOOD: list[dict[str, object]] = [
    {"user_id": "usr_1", "event_name": "view", "item_id": "prod_1", "session_id": "s1"},
    {"user_id": "usr_1", "event_name": "purchase", "item_id": "prod_1", "context": {"price": 9}},
    {"user_id": "usr_2", "event_name": "wishlist_add", "event_family": "engagement"},
    {"user_id": "usr_3", "event_name": "identify", "previous_user_id": "anon_3"},
]


def as_stored(events: list[dict[str, object]]) -> list[dict[str, object]]:
    """What the server stores for GOOD: the event_family is filled in for standard names."""
    families = {"view": "engagement", "purchase": "conversion", "identify": "system"}
    return [{"event_family": families.get(str(e["event_name"])), **e} for e in events]


# -- demo, --version ----------------------------------------------------------------------


def test_demo_delivers_every_event() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lehnz_async", "demo", "--events", "3000", "--outage", "2.5"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=cli_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "delivered 3000 of 3000, failed 0, dropped 0" in done.stdout, done.stdout
    assert "expose, click, purchase -> 6 of 6 events carry it" in done.stdout, done.stdout
    assert "the server holds 3000 events" in done.stdout
    assert "connections for 2.5 s halfway through" in done.stdout  # past outage_grace
    # whether 2.5 s of refusals outlast outage_grace depends on when retries fall
    assert re.search(
        r"\(outages seen: [01]\) and sent it when the server came back: lost 0$", done.stdout, re.M
    )
    assert re.search(r"^one track\(\) call: \d+\.\d\d µs$", done.stdout, re.M)
    assert "Traceback" not in done.stderr


def test_demo_without_rich_prints_plain_progress(tmp_path: Path) -> None:
    # A `rich` package that cannot be imported shadows the installed one.
    (tmp_path / "rich").mkdir()
    (tmp_path / "rich" / "__init__.py").write_text("raise ImportError('rich is absent')\n")
    done = subprocess.run(
        [sys.executable, "-m", "lehnz_async", "demo", "--events", "1000", "--outage", "0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=cli_env(PYTHONPATH=str(tmp_path)),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "delivered 1000 of 1000"


def test_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lehnz_async", "--version"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"lehnz-async {__version__}"


# -- send ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_send_reports_bad_lines_and_sends_the_good_ones(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        jsonl(
            GOOD[0],
            "{not json",  # line 2
            {"user_id": "usr_9", "event_name": "view", "colour": "red"},  # line 3
            GOOD[1],
            "",  # line 5: blank, skipped
            {"user_id": "usr_9", "event_name": "signup"},  # line 6: custom, no family
            "[1, 2]",  # line 7
            GOOD[2],
            {"user_id": "usr_9", "event_name": "identify"},  # line 9
            {"user_id": "usr_9", "event_name": "view", "previous_user_id": "anon_9"},  # 10
            GOOD[3],
        )
    )
    async with ReferenceServer() as server:
        code, out, err = await run_cli(
            "send", str(path), "--endpoint", server.url, "--api-key", server.api_key
        )
        assert code == 1, err
        assert server.events == as_stored(GOOD)
    assert re.search(r"^line 2: not valid JSON", err, re.M), err
    assert re.search(r"^line 3: unknown field\(s\): colour$", err, re.M), err
    assert re.search(r"^line 6: event_family: custom event name 'signup'", err, re.M), err
    assert re.search(r"^line 7: not a JSON object but an array$", err, re.M), err
    assert re.search(r"^line 9: previous_user_id: is required", err, re.M), err
    assert re.search(r"^line 10: previous_user_id: only allowed on identify", err, re.M), err
    assert "line 5" not in err
    assert "read 11 lines: 4 events, 6 bad, 1 blank" in out
    assert "delivered 4 of 4" in out


@pytest.mark.anyio
async def test_send_all_good_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(jsonl(*GOOD))
    async with ReferenceServer() as server:
        code, out, err = await run_cli(
            "send", str(path), "--api-key", server.api_key, env=cli_env(LEHNZ_ENDPOINT=server.url)
        )
        assert code == 0, err
        assert server.events == as_stored(GOOD)
    assert "delivered 4 of 4 (failed 0, dropped 0)" in out
    assert err == ""


@pytest.mark.anyio
async def test_send_reads_stdin_and_takes_the_key_from_the_environment() -> None:
    events = [{"user_id": f"usr_{i}", "event_name": "click", "item_id": "p"} for i in range(1200)]
    async with ReferenceServer() as server:
        code, out, err = await run_cli(
            "send",
            "-",
            "--endpoint",
            server.url,
            stdin=jsonl(*events),
            env=cli_env(LEHNZ_API_KEY=server.api_key),
        )
        assert code == 0, err
        # each once; batches go out concurrently, so not necessarily in the file's order
        assert sorted(e["user_id"] for e in server.events) == sorted(e["user_id"] for e in events)
    assert "delivered 1200 of 1200" in out


@pytest.mark.anyio
async def test_send_counts_events_the_server_refuses(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(jsonl(*GOOD))
    async with ReferenceServer(api_keys={"lehnz_pk_good"}) as server:
        code, out, err = await run_cli(
            "send", str(path), "--endpoint", server.url, "--api-key", "lehnz_pk_other"
        )
        assert server.events == []
    assert code == 1
    assert "lines 1-4: not delivered (--resume sends them): the API key was refused" in err
    assert "delivered 0 of 4 (failed 4, dropped 0)" in out
    assert "done up to line 0 of 4" in out


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no API key"),
        (["--api-key", "lehnz_sk_secret"], "--api-key holds a secret key"),
        ([], "pass --api-key lehnz_pk_... or set LEHNZ_API_KEY"),
        (["--api-key", "lehnz_pk_ x"], "--api-key is not a well-formed"),
        (["--api-key", "lehnz_pk_x", "--endpoint", "ftp://x"], "endpoint must be an http"),
    ],
)
async def test_send_configuration_errors_exit_2_on_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(jsonl(*GOOD))
    code, out, err = await run_cli("send", str(path), *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lehnz-async: error: "), err
    assert message in err
    assert out == ""


@pytest.mark.anyio
async def test_send_missing_file_exits_2(tmp_path: Path) -> None:
    code, _, err = await run_cli("send", str(tmp_path / "nope.jsonl"), "--api-key", "lehnz_pk_x")
    assert code == 2
    assert err.count("\n") == 1 and "No such file" in err, err


# -- serve --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_serve_accepts_events_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lehnz_async",
        "serve",
        "--port",
        "0",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        with anyio.fail_after(TIMEOUT):
            line = (await proc.stdout.readline()).decode()
            match = re.fullmatch(
                r"listening on (http://127\.0\.0\.1:\d+/api/v1/events/ingest)\n", line
            )
            assert match, line
            key_line = (await proc.stdout.readline()).decode()
            assert key_line.startswith("api key: lehnz_pk_test"), key_line
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    match[1],
                    json={"user_id": "usr_1", "event_family": "engagement", "event_name": "view"},
                    headers={"X-API-KEY": "lehnz_pk_test"},
                ) as response,
            ):
                assert response.status == 202
                assert await response.json() == {"accepted": 1}
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            err = (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "1 events -> 202" in err, err
    assert "Traceback" not in err
