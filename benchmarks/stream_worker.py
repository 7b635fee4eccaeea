"""Throughput of examples/stream_worker.py: acknowledging by `mark()` against flushing
every 500 messages.

    python benchmarks/stream_worker.py [--messages 100000] [--workers 3] [--rounds 3]
        [--server reference|sink] [--json]

One run starts a Redis server (Debian's ``redis-server``, on a free loopback port, no
persistence) and an ingestion server in a process of its own: by default the reference
server as ``python -m lehnz_async serve`` runs it (the documented contract: validation,
``Idempotency-Key`` de-duplication, 202 answers; its event inspector on), or with
``--server sink`` the benchmarks' counting sink (``sink.py``, far cheaper per event).
Then, for each round, each mode in turn (``mark``, ``flush``, ``mark``, ``flush``, ...):

1. a fresh stream; ``--workers`` worker processes (``examples/stream_worker.py --ack-mode
   MODE``, each ``--consumer wN`` of one new group) are started and have logged that they
   read (imports, connections and group creation are not timed);
2. ``--messages`` messages are added in one Lua script (a few hundred ms; atomic, so the
   blocked readers wake to the whole stream): the clock starts before it;
3. the clock stops when the group has read every message and has none pending (every
   message acknowledged), polled every 10 ms with ``XINFO GROUPS``;
4. the workers get SIGTERM; each must exit 0 and have acknowledged what it read, and the
   server must have received every message exactly once (no duplicates without a kill).

Reported: messages/s (messages ÷ that time) per mode, the median [min-max] over the
rounds, and the ratio mark ÷ flush, round by round (each mark round against the flush
round that followed it) and of the medians. Progress goes to stderr, the report to
stdout. The goal of issue 18: ``mark`` at least twice ``flush``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "examples" / "stream_worker.py"
SINK = Path(__file__).with_name("sink.py")
KEY = "lehnz_pk_bench"
INGEST_PATH = "/api/v1/events/ingest"
STARTUP_TIMEOUT = 30.0
ROUND_TIMEOUT = 300.0

#: Adds ARGV[1] messages to KEYS[1]: message i is user usr_(i % 1000), one of six event
#: names in turn, item prod_(i % 5000) (the stream of benchmarks/compare.py).
FILL = """
local names = {'view', 'click', 'view', 'add_to_cart', 'view', 'purchase'}
for i = 0, tonumber(ARGV[1]) - 1 do
  redis.call('XADD', KEYS[1], '*', 'user', 'usr_' .. (i % 1000), 'event', names[i % 6 + 1],
             'item', 'prod_' .. (i % 5000))
end
return tonumber(ARGV[1])
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[redis.Redis]:
    program = shutil.which("redis-server")
    if program is None:
        sys.exit("no redis-server: apt-get install redis-server")
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        proc = subprocess.Popen(
            [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=port, decode_responses=True)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.05)
            yield client
        finally:
            client.close()
            proc.terminate()
            proc.wait(10)


class Server:
    """The ingestion server, in a process of its own: its endpoint and its counters."""

    def __init__(self, kind: str, keep: int, latency: float) -> None:
        self.kind = kind
        if kind == "reference":
            args = [__file__, "--serve-reference", "--keep", str(keep), "--latency", str(latency)]
        else:
            args = [str(SINK), "--exit-on-stdin-eof"]
        self.proc = subprocess.Popen(
            [sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"the {kind} server did not start: {line!r}")
        self.base = f"http://127.0.0.1:{int(line.split()[1])}"

    @property
    def endpoint(self) -> str:
        return self.base + INGEST_PATH

    def counts(self) -> dict[str, int]:
        """Events accepted, requests, and (reference server) duplicate requests."""
        path = "/inspector/api/counters" if self.kind == "reference" else "/count"
        with urllib.request.urlopen(self.base + path, timeout=10) as answer:
            data = json.load(answer)
        return {
            "events": int(data["events"]),
            "requests": int(data["requests"]),
            "duplicates": int(data.get("duplicates", 0)),
        }

    def reset(self) -> None:
        path = "/inspector/api/reset" if self.kind == "reference" else "/reset"
        request = urllib.request.Request(self.base + path, method="POST", data=b"")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # both servers exit at EOF on stdin
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serve_reference(keep: int, latency: float) -> None:
    """--serve-reference: the reference server as `lehnz-async serve` runs it (bounded
    memory, no bodies kept, its inspector on), without its log line per request, with
    ``latency`` seconds added before every answer; READY <port> on stdout; stops at EOF
    on stdin."""
    import asyncio

    from lehnz_async.testing import FaultPlan, ReferenceServer

    async def serve() -> None:
        faults = FaultPlan(latency=latency)
        async with ReferenceServer(keep=keep, keep_bodies=False, faults=faults) as server:
            print(f"READY {server.port}", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(serve())


class Worker:
    """One examples/stream_worker.py process; its log is kept in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log_file = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            env=env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )

    @property
    def text(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while (found := regex.search(self.text)) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker: no {pattern!r}:\n{self.text}")
            time.sleep(0.02)
        return found

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.log_file.close()
        if code != 0:
            raise RuntimeError(f"worker exited {code}:\n{self.text}")
        return self.text


def one_round(
    client: redis.Redis, server: Server, mode: str, label: str, options: argparse.Namespace,
    directory: Path,
) -> dict[str, Any]:  # fmt: skip
    """One measurement: start the workers, add the messages, time until all are acked."""
    stream, group = f"bench:{label}", "bench"
    server.reset()
    env = {**os.environ, "LEHNZ_API_KEY": KEY, "LEHNZ_ENDPOINT": server.endpoint}
    url = f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0"
    args = ["--redis", url, "--stream", stream, "--group", group, "--ack-mode", mode]
    args += options.worker_option
    workers = [
        Worker(
            [*args, "--consumer", f"w{n}", "--block", "0.2"], env, directory / f"{label}-w{n}.log"
        )
        for n in range(1, options.workers + 1)
    ]
    try:
        for worker in workers:
            worker.wait_for(r"reading '", STARTUP_TIMEOUT)
        time.sleep(0.3)  # each has begun its first (blocking) read
        began = time.perf_counter()
        client.eval(FILL, 1, stream, options.messages)
        filled = time.perf_counter() - began
        deadline = time.monotonic() + ROUND_TIMEOUT
        while True:
            (info,) = client.xinfo_groups(stream)
            if info["entries-read"] == options.messages and info["pending"] == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not done within {ROUND_TIMEOUT} s: {info}")
            time.sleep(0.01)
        seconds = time.perf_counter() - began
        texts = [worker.stop() for worker in workers]
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
    counts = server.counts()
    acked = sum(int(m) for text in texts for m in re.findall(r"acked (\d+)", text))
    if counts["events"] != options.messages or acked != options.messages:
        raise RuntimeError(f"{mode}: server {counts}, acked {acked} of {options.messages}")
    client.delete(stream)
    return {
        "mode": mode,
        "seconds": seconds,
        "fill_seconds": filled,
        "messages_per_s": options.messages / seconds,
        "requests": counts["requests"],
        "events_per_request": options.messages / counts["requests"],
    }


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(stats: dict[str, float], spec: str) -> str:
    return f"{stats['median']:{spec}} [{stats['min']:{spec}}-{stats['max']:{spec}}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode")
    parser.add_argument("--server", choices=["reference", "sink"], default="reference")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds the reference server adds before each answer (an endpoint farther "
        "away than loopback)",
    )
    parser.add_argument(
        "--worker-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="pass this to every worker, e.g. --worker-option=--windows=4 (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    parser.add_argument("--serve-reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=int, default=100_000, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_reference:
        serve_reference(options.keep, options.latency)
        return 0
    if options.latency and options.server != "reference":
        parser.error("--latency needs --server reference")
    runs: list[dict[str, Any]] = []
    began = time.monotonic()
    server = Server(options.server, options.messages, options.latency)
    try:
        with redis_server() as client, tempfile.TemporaryDirectory() as directory:
            for n in range(1, options.rounds + 1):
                for mode in ("mark", "flush"):
                    run = one_round(client, server, mode, f"{mode}-{n}", options, Path(directory))
                    log(
                        f"round {n} {mode}: {run['messages_per_s']:,.0f} messages/s "
                        f"({run['seconds']:.2f} s, fill {run['fill_seconds']:.2f} s, "
                        f"{run['events_per_request']:.0f} events/request)"
                    )
                    runs.append(run)
            redis_version = str(client.info("server")["redis_version"])
    finally:
        server.stop()
    rates = {
        mode: [r["messages_per_s"] for r in runs if r["mode"] == mode] for mode in ("mark", "flush")
    }
    ratios = [m / f for m, f in zip(rates["mark"], rates["flush"], strict=True)]
    result = {
        "setup": {
            "messages": options.messages,
            "workers": options.workers,
            "rounds": options.rounds,
            "server": options.server,
            "python": platform.python_version(),
            "redis": redis_version,
            "redis_py": redis.__version__,
            "parser": "hiredis" if importlib.util.find_spec("hiredis") else "pure Python",
            "latency": options.latency,
            "worker_options": options.worker_option,
            "cpus": os.cpu_count(),
            "seconds": time.monotonic() - began,
        },
        "runs": runs,
        "mark": summary(rates["mark"]),
        "flush": summary(rates["flush"]),
        "ratio_per_round": summary(ratios),
        "ratio_of_medians": statistics.median(rates["mark"]) / statistics.median(rates["flush"]),
    }
    if options.json:
        print(json.dumps(result, indent=2))
        return 0
    setup = result["setup"]
    print(
        f"{options.messages:,} messages, {options.workers} workers, {options.server} server "
        f"(+{options.latency * 1000:g} ms a request), Redis {setup['redis']}, redis-py "
        f"{setup['redis_py']} ({setup['parser']} parser), CPython {setup['python']}, "
        f"{setup['cpus']} CPUs; median [min-max] of {options.rounds} alternated rounds "
        f"({setup['seconds']:.0f} s)"
    )
    print(f"  mark  (ack when mark.settled()): {fmt(result['mark'], ',.0f')} messages/s")
    print(f"  flush (flush() every 500):       {fmt(result['flush'], ',.0f')} messages/s")
    print(
        f"  mark / flush: {result['ratio_of_medians']:.2f}x of the medians; "
        f"per round {fmt(result['ratio_per_round'], '.2f')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
