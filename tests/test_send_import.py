"""``lehnz-async send`` as a bulk import: any bytes on a line, every bad or refused line
reported with its number, a checkpoint, Ctrl-C then ``--resume`` without duplicates, and
a progress bar only on a terminal. The CLI runs in subprocesses, against a reference
server over loopback."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from lehnz_async.testing import FaultPlan, ReferenceServer

from .test_cli import cli_env, run_cli

pytestmark = pytest.mark.anyio

TIMEOUT = 60.0
DEEP = b"[" * 100_000 + b"]" * 100_000


def line(i: int, **fields: Any) -> bytes:
    return msgspec.json.encode({"user_id": f"usr_{i}", "event_name": "view", **fields})


def user_ids(server: ReferenceServer) -> list[str]:
    return [e["user_id"] for e in server.events]


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = msgspec.json.decode(path.read_bytes())
    except (FileNotFoundError, msgspec.DecodeError):
        return None
    return data


def done_up_to(out: str) -> tuple[int, int]:
    match = re.search(r"^done up to line (\d+) of (\d+)", out, re.M)
    assert match, out
    return int(match[1]), int(match[2])


async def test_every_bad_or_refused_line_is_reported_by_number(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    lines = [
        b"\xef\xbb\xbf" + line(1) + b"\r\n",  # 1: a BOM, CRLF
        b'{"user_id": "usr_\xff\xfe", "event_name": "view"}\r\n',  # 2: invalid UTF-8
        b'{"user_id": "usr_x", "event_name": "view", "context": ' + DEEP + b"}\r\n",  # 3
        DEEP + b"\r\n",  # 4: deep, and an array
        b'[{"user_id": "usr_x", "event_name": "view"}]\r\n',  # 5: an array
        b"42\r\n",  # 6: a number
        line(7, item_id="p7") + b"\r\n",
        b"\x00\xff\x1b[2J binary \xc3\x28\r\n",  # 8: junk
        line(9, context={"blob": "x" * 10_000_000}) + b"\r\n",  # 9: 10 MB: the server's 413
        line(10, item_id="reject_me") + b"\r\n",  # 10: the server's 400
        line(11) + b"\r\n",
        b"\r\n",  # 12: blank
        b'{"user_id": 5, "event_name": "view"}\r\n',  # 13: wrong type
        line(10, item_id="reject_me") + b"\r\n",  # 14: the same as line 10
        line(15),  # no newline at the end
    ]
    path.write_bytes(b"".join(lines))
    plan = FaultPlan(reject_event=lambda e: "bad item" if e.get("item_id") == "reject_me" else None)
    async with ReferenceServer(faults=plan) as server:
        code, out, err = await run_cli(
            "send", str(path), "--endpoint", server.url, "--api-key", server.api_key
        )
        assert sorted(user_ids(server)) == ["usr_1", "usr_11", "usr_15", "usr_7"], err
    assert code == 1, err
    assert "Traceback" not in err
    reported = {int(n) for n in re.findall(r"^line (\d+): ", err, re.M)}
    assert reported == {2, 3, 4, 5, 6, 8, 9, 10, 13, 14}, err
    assert re.search(r"^line 2: not valid JSON \(invalid UTF-8 at byte 17\)$", err, re.M), err
    assert re.search(r"^line 8: not valid JSON \(invalid UTF-8 at byte 1\)$", err, re.M), err
    assert re.search(r"^line 4: not valid JSON \(nested too deeply\)$", err, re.M), err
    assert re.search(r"^line 3: not valid JSON \(nested too deeply\)$", err, re.M), err
    assert re.search(r"^line 6: not a JSON object but a number$", err, re.M), err
    assert re.search(r"^line 9: refused: .*413", err, re.M), err
    assert re.search(r"^line 10: refused: .*bad item", err, re.M), err
    assert re.search(r"^line 14: refused: .*bad item", err, re.M), err
    assert re.search(r"^line 13: user_id: must be a str", err, re.M), err
    assert "read 15 lines: 7 events, 7 bad, 1 blank" in out
    assert "delivered 4 of 7 (failed 3, dropped 0)" in out
    assert done_up_to(out) == (15, 15)  # every line delivered or reported bad


async def test_ctrl_c_then_resume_sends_each_event_exactly_once(tmp_path: Path) -> None:
    n = 100_000
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(line(i) + b"\n" for i in range(1, n + 1)))
    checkpoint = tmp_path / "events.jsonl.lehnz-checkpoint"

    def progressed() -> bool:  # the checkpoint is written while the import goes on
        data = read_checkpoint(checkpoint)
        return data is not None and data["line"] > 0

    # latency: the import takes a few seconds, and is interrupted half way
    async with ReferenceServer(faults=FaultPlan(latency=0.05)) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lehnz_async",
            "send",
            str(path),
            "--endpoint",
            server.url,
            "--api-key",
            server.api_key,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )
        try:
            await server.wait_for(lambda: len(server.events) >= 3_000 and progressed(), TIMEOUT)
            proc.send_signal(signal.SIGINT)
            with anyio.fail_after(TIMEOUT):
                out_b, err_b = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        out, err = out_b.decode(), err_b.decode()
        assert proc.returncode == 130, err
        done, total = done_up_to(out)
        assert 3_000 <= done < n, out  # interrupted half way...
        assert total == n  # ...of the whole file, not of what was read...
        assert f"read {done} lines: {done} events" in out  # ...delivering all it had read
        assert "interrupted: --resume continues after line" in out
        data = read_checkpoint(checkpoint)
        assert data == {"file": str(path), "line": done, "settled": done, "resend": []}
        first = user_ids(server)
        assert sorted(first, key=lambda u: int(u[4:])) == [f"usr_{i}" for i in range(1, done + 1)]

        server.faults.latency = 0.0
        code, out, err = await run_cli(
            "send", str(path), "--endpoint", server.url, "--api-key", server.api_key, "--resume"
        )
        assert code == 0, err
        assert f"read {n} lines ({done} done before, skipped): {n - done} events" in out
        assert done_up_to(out) == (n, n)
        counts = Counter(user_ids(server))
    assert len(counts) == n and set(counts.values()) == {1}  # each stored exactly once
    assert set(counts) == {f"usr_{i}" for i in range(1, n + 1)}


async def test_lines_not_delivered_are_sent_again_by_resume(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(line(i) + b"\n" for i in range(1, 101)))
    async with ReferenceServer() as server:
        await server.outage("refuse")  # down for the whole first run
        code, out, err = await run_cli(
            "send",
            str(path),
            "--endpoint",
            server.url,
            "--api-key",
            server.api_key,
            "--close-timeout",
            "1",
        )
        assert code == 1
        assert re.search(r"^lines 1-100: not delivered \(--resume sends them\): ", err, re.M), err
        assert done_up_to(out) == (0, 100)
        assert "100 line(s) not delivered: --resume sends them again" in out
        checkpoint = read_checkpoint(tmp_path / "events.jsonl.lehnz-checkpoint")
        assert checkpoint is not None
        assert (checkpoint["line"], checkpoint["settled"], checkpoint["resend"]) == (
            0,
            100,
            [[1, 100]],
        )
        await server.restore()
        code, out, err = await run_cli(
            "send", str(path), "--endpoint", server.url, "--api-key", server.api_key, "--resume"
        )
        assert code == 0, err
        assert done_up_to(out) == (100, 100)
        assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(1, 101))


@pytest.mark.parametrize(
    ("args", "checkpoint", "message"),
    [
        pytest.param(
            ["-", "--resume"],
            None,
            "--resume needs --checkpoint PATH when reading stdin",
            id="stdin-without-checkpoint",
        ),
        pytest.param(
            ["{file}", "--resume"],
            b'{"file": "/elsewhere.jsonl", "line": 1, "settled": 1, "resend": []}',
            "is for /elsewhere.jsonl",
            id="another-file",
        ),
        pytest.param(["{file}", "--resume"], b"{not json", "unreadable checkpoint", id="corrupt"),
    ],
)
async def test_resume_refuses_what_it_cannot_trust(
    tmp_path: Path, args: list[str], checkpoint: bytes | None, message: str
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(line(1) + b"\n")
    if checkpoint is not None:
        (tmp_path / "events.jsonl.lehnz-checkpoint").write_bytes(checkpoint)
    args = [a.format(file=path) for a in args]
    code, out, err = await run_cli(
        "send", *args, "--api-key", "lehnz_pk_x", "--endpoint", "http://127.0.0.1:9/x", stdin=b""
    )
    assert code == 2 and message in err, err
    assert out == ""


def run_on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run the CLI with its stderr on a pseudo-terminal; the exit code and what it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lehnz_async", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env=cli_env(TERM="xterm-256color", COLUMNS="120"),
    )
    os.close(slave)
    drawn = bytearray()
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not data:
                break
            drawn += data
    finally:
        os.close(master)
        code = proc.wait(TIMEOUT)
    return code, drawn.decode("utf-8", "replace")


async def test_a_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(line(i) + b"\n" for i in range(1, 2001)))
    async with ReferenceServer() as server:
        args = ["send", str(path), "--endpoint", server.url, "--api-key", server.api_key]
        code, drawn = await asyncio.to_thread(run_on_a_terminal, args)
        assert code == 0, drawn
        assert re.search(r"2,000 lines +[\d,]+ lines/s +2,000 delivered", drawn), drawn
        code, _, err = await run_cli(*args, "--restart")  # stderr is a pipe: nothing drawn
        assert code == 0 and err == "", err
        assert len(server.events) == 4000


async def test_a_checkpoint_left_by_an_earlier_run_needs_resume_or_restart(tmp_path: Path) -> None:
    """Run again without --resume, send would silently send every line again: it stops
    before sending anything and says which flag does what."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(line(i) + b"\n" for i in range(1, 11)))
    async with ReferenceServer() as server:
        args = ("send", str(path), "--endpoint", server.url, "--api-key", server.api_key)
        code, out, err = await run_cli(*args)
        assert code == 0, err
        code, out, err = await run_cli(*args)
        assert code == 2 and out == ""
        assert err.strip() == (
            f"lehnz-async: error: a checkpoint of an earlier run exists ({path}.lehnz-checkpoint): "
            "--resume sends only what it did not deliver; --restart sends every line again "
            "(the server would store the events it delivered twice)"
        )
        assert len(server.events) == 10  # nothing was sent the second time
        code, out, err = await run_cli(*args, "--resume")
        assert code == 0 and "read 10 lines (10 done before, skipped): 0 events" in out
        code, out, err = await run_cli(*args, "--restart")
        assert code == 0 and "delivered 10 of 10" in out
        assert len(server.events) == 20
        code, out, err = await run_cli(*args, "--restart", "--resume")
        assert code == 2 and "not allowed with argument" in err


async def test_when_nothing_can_be_delivered_send_says_why(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(line(i) + b"\n" for i in range(1, 6)))
    with socket.socket() as sock:  # a port nobody listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = await run_cli(
        "send",
        str(path),
        "--endpoint",
        f"http://127.0.0.1:{port}/api/v1/events/ingest",
        "--api-key",
        "lehnz_pk_test",
        "--close-timeout",
        "3",
    )
    assert code == 1
    assert "delivered 0 of 5" in out and "5 line(s) not delivered" in out
    (why,) = [x for x in err.splitlines() if x.startswith("lines 1-5: not delivered")]
    # the outage's cause, or (before outage_grace passed) the batch's last attempt
    assert re.search(r"(the endpoint was down|its last attempt): ClientConnectorError", why), err
    assert f"127.0.0.1:{port}" in why


def test_help_describes_every_option_with_its_default() -> None:
    def help_of(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "lehnz_async", *args, "--help"],
            capture_output=True,
            text=True,
            check=True,
            env=cli_env(),
        ).stdout

    top = help_of()
    assert "only module" not in top and "``" not in top  # no internal docstring
    for command in ("demo", "send", "serve"):
        assert re.search(rf"^    {command} +\S", top, re.M), top  # each with a description
        text = help_of(command)
        options = re.findall(r"^  (--[a-z-]+)", text, re.M)
        assert options, text
        for option in options:  # each option's line, or the lines under it, say something
            block = text.split(option, 1)[1].split("\n  -", 1)[0]
            assert len(block.split()) >= 4, (command, option, block)
    send = " ".join(help_of("send").split())
    assert "(default: 30.0)" in send and "(default: $LEHNZ_API_KEY)" in send
    assert "Exit status: 0 all delivered" in send
    serve = " ".join(help_of("serve").split())
    assert "(default: 8080)" in serve and "(default: 10000)" in serve
