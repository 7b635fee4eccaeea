"""What lehnz_async, Segment and PostHog do while the ingestion endpoint is down.

    python benchmarks/outage.py                       # outages of 10, 60 and 300 s (~8 min)
    python benchmarks/outage.py --outages 60 --down 502
    python benchmarks/outage.py --smoke --no-peers    # ~10 s: one 4 s outage (what CI runs)
    python benchmarks/outage.py --json                # every raw figure, as JSON

A producer per library tracks a steady 500 events/s (compare.py's stream, each event with
a unique ``seq``) for ``--before`` seconds, through an outage of D seconds and for
``--after`` seconds after it, then flushes and closes its client. Each library sends to a
loopback sink process of its own, which stops listening for D seconds (connections
refused, open ones cut; ``--down 502``: a proxy answering nginx's 502 page instead) and
listens again on the same port. The sink records when each ``seq`` arrived; the producer
records what it tracked, what its library reported as dropped, and every request attempt
it made to the sink (see `SocketProbe`). benchmarks/README.md explains every figure.

Everything is on loopback; every process and every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import errno
import inspect
import json
import os
import platform
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn
from urllib.parse import urlsplit

import msgspec
from aiohttp import web
from drivers import (
    LEHNZ_PATH,
    PEERS,
    Driver,
    LehnzDriver,
    Peer,
    SinkClient,
    git_commit,
    make_stream,
    rss_now,
    rss_peak,
)
from sink import FORMATS, KEY_PREFIX

from lehnz_async import Tracker

SCRIPT = Path(__file__).resolve()
LIBRARIES = ("lehnz_async", "segment", "posthog")
#: Where each library POSTs (the drivers' paths: sink.py answers each as its server does).
PATHS = {
    "lehnz_async": LEHNZ_PATH,
    "segment": PEERS["segment"].path,
    "posthog": PEERS["posthog"].path,
}
DOWN_KINDS = ("refuse", "502")
TICK = 0.01  # the producer wakes every 10 ms and tracks what is due (5 events at 500/s)
SAMPLE_EVERY = 0.25  # seconds between two samples of the producer's counters
START_DELAY = 0.5  # seconds between "every process is ready" and the first event
CLOSE_BOUND = 40.0  # seconds a client's close may take after its flush
STARTUP_BOUND = 60.0  # seconds a process may take to start and say READY
_PENDING = (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
#: lehnz_async's default outage_grace (2 s): in-flight figures are also given for the
#: outage less its first GRACE seconds, for every library alike.
GRACE = float(inspect.signature(Tracker).parameters["outage_grace"].default)
NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


class Options(NamedTuple):
    """What to run (the command-line options; see benchmarks/README.md)."""

    outages: tuple[float, ...] = (10.0, 60.0, 300.0)
    down: str = "refuse"
    rate: float = 500.0
    before: float = 5.0
    after: float = 20.0
    flush_timeout: float = 120.0
    libraries: tuple[str, ...] = LIBRARIES
    sequential: bool = False


DEFAULTS = Options()
SMOKE = Options(outages=(4.0,), before=1.0, after=3.0, flush_timeout=15.0)


# -- the sink: counts every seq, goes down and comes back --------------------------------------


class _Seq(msgspec.Struct, gc=False):
    seq: int


class _LehnzEvent(msgspec.Struct, gc=False):
    context: _Seq  # the benchmark's context: {"position": ..., "page": ..., "seq": ...}


class _PeerEvent(msgspec.Struct, gc=False):
    properties: _Seq  # the peers' properties: {"item_id": ..., ..., "seq": ...}


class _SegmentBody(msgspec.Struct, gc=False):
    batch: list[_PeerEvent]
    writeKey: str  # the wire name


class _PostHogBody(msgspec.Struct, gc=False):
    batch: list[_PeerEvent]
    api_key: str


_decode_lehnz = msgspec.json.Decoder(list[_LehnzEvent]).decode
_decode_segment = msgspec.json.Decoder(_SegmentBody).decode
_decode_posthog = msgspec.json.Decoder(_PostHogBody).decode
#: path -> the seqs of a body in that path's format (msgspec.DecodeError if not in it).
SEQS: dict[str, Callable[[bytes], list[int]]] = {
    PATHS["lehnz_async"]: lambda body: [e.context.seq for e in _decode_lehnz(body)],
    PATHS["segment"]: lambda body: [e.properties.seq for e in _decode_segment(body).batch],
    PATHS["posthog"]: lambda body: [e.properties.seq for e in _decode_posthog(body).batch],
}


def _abort(request: web.BaseRequest) -> NoReturn:
    """Reset the request's connection and end its handler without an answer."""
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError  # aiohttp ends the handler quietly


class OutageSink:
    """One library's endpoint: counts the seqs it receives (with their arrival time on
    ``time.monotonic()``, the clock every process of the run shares on Linux), and goes
    down (`go_down`) and comes back (`come_back`) when told."""

    def __init__(self, path: str, kind: str) -> None:
        self.path, self.kind = path, kind
        self.seqs, self.form = SEQS[path], FORMATS[path]
        self.arrivals: dict[int, float] = {}  # seq -> first arrival
        self.duplicates = 0
        self.requests: list[tuple[float, int, int]] = []  # (time, status, new events)
        self.rejected = 0
        self.state = "up"  # or "refuse", "502"
        self.down_at: float | None = None
        self.up_at: float | None = None
        self.active = self.max_active = self.max_active_down = 0
        self.runner: web.AppRunner | None = None
        self.site: web.BaseSite | None = None
        self.held: socket.socket | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(self.path, self.ingest)
        app.router.add_post("/{tail:.*}", self.unknown)
        return app

    async def ingest(self, request: web.Request) -> web.Response:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        if self.state != "up":
            self.max_active_down = max(self.max_active_down, self.active)
        try:
            try:
                body = await request.read()
            except ConnectionResetError:
                self.requests.append((time.monotonic(), 0, 0))
                raise
            now = time.monotonic()
            if self.state == "refuse":  # a request on a connection opened before: cut
                self.requests.append((now, 0, 0))
                _abort(request)
            if self.state == "502":  # nginx reads the body, then finds no upstream
                self.requests.append((now, 502, 0))
                return web.Response(status=502, body=NGINX_502, content_type="text/html")
            key = request.headers.get("X-API-KEY", "")
            if self.path == LEHNZ_PATH and not key.startswith(KEY_PREFIX):
                self.rejected += 1
                return web.Response(status=401, body=b'{"error":"bad key"}')
            try:
                seqs = self.seqs(body)
            except msgspec.DecodeError:
                self.rejected += 1
                return web.Response(status=400, body=self.form.error)
            new = 0
            arrivals = self.arrivals
            for seq in seqs:
                if seq in arrivals:
                    self.duplicates += 1
                else:
                    arrivals[seq] = now
                    new += 1
            self.requests.append((now, self.form.status, new))
            body = self.form.answer(len(seqs))
            return web.Response(status=self.form.status, body=body, content_type="application/json")
        finally:
            self.active -= 1

    async def unknown(self, request: web.Request) -> web.Response:
        self.rejected += 1
        return web.Response(status=404)

    async def start(self) -> int:
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, "127.0.0.1", 0, backlog=1024)
        await self.site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def go_down(self) -> None:
        """refuse: stop listening and cut every open connection, as if the process had
        gone away; the port stays bound (not listening), so connections are refused.
        502: a proxy in front answers every request with nginx's 502 page."""
        assert self.runner is not None and self.site is not None
        self.down_at = time.monotonic()
        if self.kind == "502":
            self.state = "502"
            return
        self.state = "refuse"
        await self.site.stop()
        self.site = None
        held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", self.port))
        self.held = held
        if self.runner.server is not None:
            for connection in list(self.runner.server.connections):
                connection.force_close()

    async def come_back(self) -> None:
        """Listen again on the same port (refuse), or stop answering 502."""
        assert self.runner is not None
        if self.held is not None:
            self.site = web.SockSite(self.runner, self.held, backlog=1024)
            await self.site.start()  # asyncio calls listen() on the held socket
            self.held = None
        self.state = "up"
        self.up_at = time.monotonic()

    def report(self) -> dict[str, Any]:
        order = sorted(self.arrivals)
        return {
            "port": self.port,
            "path": self.path,
            "kind": self.kind,
            "down_at": self.down_at,
            "up_at": self.up_at,
            "seqs": order,
            "times": [round(self.arrivals[s], 4) for s in order],
            "duplicates": self.duplicates,
            "requests": [(round(t, 4), status, n) for t, status, n in self.requests],
            "rejected": self.rejected,
            "max_active": self.max_active,
            "max_active_down": self.max_active_down,
        }


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve_sink(path: str, kind: str) -> None:
    """Listen on 127.0.0.1 (ephemeral port), print ``READY <port>``; read
    ``GO <down_at> <up_at> <deadline>`` (monotonic seconds) on stdin, go down and come
    back at those times; at stdin's end of file (or the deadline) print the report (one
    JSON line) and exit."""
    sink = OutageSink(path, kind)
    port = await sink.start()
    print(f"READY {port}", flush=True)
    stdin = await _stdin_lines()
    line = await stdin.readline()
    if line.startswith(b"GO "):
        down_at, up_at, deadline = (float(x) for x in line.split()[1:4])
        loop = asyncio.get_running_loop()

        async def schedule() -> None:
            await asyncio.sleep(max(0.0, down_at - loop.time()))
            await sink.go_down()
            await asyncio.sleep(max(0.0, up_at - loop.time()))
            await sink.come_back()

        async def until_eof() -> None:
            while await stdin.read(4096):
                pass

        timed = asyncio.create_task(schedule())
        eof = asyncio.create_task(until_eof())
        await asyncio.wait({eof}, timeout=max(0.0, deadline - loop.time()))
        for task in (timed, eof):
            task.cancel()
        await asyncio.gather(timed, eof, return_exceptions=True)
    sys.stdout.write(json.dumps(sink.report()) + "\n")
    sys.stdout.flush()
    assert sink.runner is not None
    with contextlib.suppress(Exception):
        await asyncio.wait_for(sink.runner.cleanup(), 5)
    if sink.held is not None:
        sink.held.close()


# -- the producer: a steady stream into one library ----------------------------------------------


class SocketProbe:
    """Every request attempt this process makes to one loopback port, seen at the socket
    level, the same way for every library (aiohttp on asyncio, requests/urllib3 in a
    thread alike): an attempt starts with ``connect()`` (a refused connection is one
    attempt) or with the first bytes sent on an idle open connection, and ends at the
    first bytes received ("answered"), or when the socket fails or is closed first
    ("closed": refused, or cut). Each attempt is ``[start, end, outcome]`` on
    ``time.monotonic()``; ``end`` is None if it never ended."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.attempts: list[list[Any]] = []
        self._open: dict[int, int] = {}  # id(socket) -> its attempt's index, or -1 if idle
        self._lock = threading.Lock()

    def _start(self, sock: socket.socket, connecting: bool) -> None:
        key = id(sock)
        with self._lock:
            if connecting or self._open.get(key) == -1:
                self._open[key] = len(self.attempts)
                self.attempts.append([time.monotonic(), None, None])

    def _end(self, sock: socket.socket, outcome: str, forget: bool = False) -> None:
        key = id(sock)
        with self._lock:
            index = self._open.get(key)
            if index is None:
                return
            if index >= 0:
                self.attempts[index][1:] = [time.monotonic(), outcome]
            if forget:
                del self._open[key]
            else:
                self._open[key] = -1

    def install(self) -> None:
        """Wrap the methods of `socket.socket` that connect, send, receive and close."""
        cls, probe, target = socket.socket, self, ("127.0.0.1", self.port)
        connect, connect_ex = cls.connect, cls.connect_ex
        send, sendall, sendmsg = cls.send, cls.sendall, cls.sendmsg
        recv, recv_into, close, detach = cls.recv, cls.recv_into, cls.close, cls.detach
        pending = (BlockingIOError, InterruptedError)

        def _connect(sock: socket.socket, address: Any) -> None:
            if tuple(address[:2]) != target:
                return connect(sock, address)
            probe._start(sock, connecting=True)
            try:
                return connect(sock, address)
            except pending:
                raise
            except OSError:
                probe._end(sock, "closed")
                raise

        def _connect_ex(sock: socket.socket, address: Any) -> int:
            if tuple(address[:2]) != target:
                return connect_ex(sock, address)
            probe._start(sock, connecting=True)
            err = connect_ex(sock, address)
            if err not in (0, *_PENDING):
                probe._end(sock, "closed")
            return err

        def _sending(method: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
                if id(sock) in probe._open:
                    probe._start(sock, connecting=False)
                return method(sock, *args, **kwargs)

            return wrapper

        def _receiving(method: Callable[..., Any], size: Callable[[Any], int]) -> Any:
            def wrapper(sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
                if id(sock) not in probe._open:
                    return method(sock, *args, **kwargs)
                try:
                    result = method(sock, *args, **kwargs)
                except pending:
                    raise
                except OSError:
                    probe._end(sock, "closed")
                    raise
                probe._end(sock, "answered" if size(result) else "closed")
                return result

            return wrapper

        def _closing(method: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
                if id(sock) in probe._open:
                    probe._end(sock, "closed", forget=True)
                return method(sock, *args, **kwargs)

            return wrapper

        patches: dict[str, Any] = {
            "connect": _connect,
            "connect_ex": _connect_ex,
            "send": _sending(send),
            "sendall": _sending(sendall),
            "sendmsg": _sending(sendmsg),
            "recv": _receiving(recv, len),
            "recv_into": _receiving(recv_into, int),
            "close": _closing(close),
            "detach": _closing(detach),
        }
        for name, function in patches.items():
            setattr(cls, name, function)


class _RecordingPeer(Peer):
    """Mixed into a driver's peer class: keeps the seqs of the batches its SDK gives up on
    (``on_error(error, batch)``), besides the driver's count."""

    gave_up: list[int]

    def _on_error(self, error: Exception, batch: list[Any]) -> None:
        super()._on_error(error, batch)
        self.gave_up.extend(int(message["properties"]["seq"]) for message in batch)


def make_driver(library: str) -> Driver:
    """The library's driver from drivers.py, configured exactly as compare.py's."""
    if library == "lehnz_async":
        return LehnzDriver()
    peer_type = type(f"Recording{PEERS[library].__name__}", (_RecordingPeer, PEERS[library]), {})
    driver: Peer = peer_type()
    driver.gave_up = []  # type: ignore[attr-defined]
    return driver


def _accepted(library: str, result: Any) -> bool:
    """Whether the SDK took the event: Segment's track() returns (False, msg) when its
    queue is full; PostHog's capture() returns the event's uuid, or None when dropped."""
    if library == "segment":
        return bool(result[0])
    return result is not None


async def _bounded(function: Callable[[], Any], seconds: float) -> bool:
    """Run a blocking ``function`` in a daemon thread; whether it returned in time (if not,
    it is left running: the process exits with os._exit)."""
    thread = threading.Thread(target=function, daemon=True)
    thread.start()
    deadline = time.monotonic() + seconds
    while thread.is_alive() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return not thread.is_alive()


async def produce(library: str, sink_url: str, rate: float, flush_timeout: float) -> dict[str, Any]:
    """Start the library's client, print ``READY``, read
    ``GO <t0> <seconds> <down_at> <up_at>`` on stdin; track ``rate`` events/s from ``t0``
    for ``seconds``, then flush (at most ``flush_timeout`` s) and close; return the
    figures."""
    port = urlsplit(sink_url).port
    assert port is not None
    probe = SocketProbe(port)
    probe.install()
    driver = make_driver(library)
    config = await driver.start(SinkClient(sink_url), None)
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if not line.startswith("GO "):
        raise SystemExit("no GO line")
    t0, seconds, down_at, up_at = (float(x) for x in line.split()[1:5])
    tracker = driver.tracker if isinstance(driver, LehnzDriver) else None
    peer = driver if isinstance(driver, Peer) else None

    total = round(rate * seconds)
    tracked, dropped_seqs = 0, []
    marks: dict[str, dict[str, int]] = {}  # "down"/"up": counters when it happened
    samples: list[tuple[float, int, int, int]] = []  # (time, tracked, rss, lehnz requests)
    next_sample, hard_stop = t0, t0 + seconds + 30.0
    outage_at: float | None = None
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    while tracked < total:
        now = time.monotonic()
        if now > hard_stop:  # far behind schedule: stop anyway (reported as tracked)
            break
        stats = tracker.stats if tracker is not None else None
        requests = stats.requests if stats is not None else -1
        if stats is not None and outage_at is None and stats.state == "outage":
            outage_at = now  # when the tracker itself declared the outage
        for name, at in (("down", down_at), ("up", up_at)):
            if name not in marks and now >= at:
                marks[name] = {"tracked": tracked, "requests": requests}
        due = min(total, int((now - t0) * rate) + 1)
        if due > tracked:
            chunk = make_stream(tracked, due, peer is not None)
            for k, fields in enumerate(chunk[-1]):  # the context, or the properties
                fields["seq"] = tracked + k
            if peer is None:
                driver.loop(*chunk)
            else:
                call = peer.call
                for k, args in enumerate(zip(*chunk, strict=True)):
                    if not _accepted(library, call(*args)):
                        dropped_seqs.append(tracked + k)
            tracked = due
        if now >= next_sample:
            samples.append((round(now, 4), tracked, rss_now(), requests))
            next_sample += SAMPLE_EVERY
        await asyncio.sleep(TICK)
    production_end = time.monotonic()
    for name in ("down", "up"):
        marks.setdefault(name, {"tracked": tracked, "requests": -1})

    result: dict[str, Any] = {
        "library": library,
        "config": config,
        "pid": os.getpid(),
        "t0": t0,
        "tracked": tracked,
        "marks": marks,
        "outage_at": outage_at,
        "production_end": production_end,
        "samples": samples,
        "dropped_seqs": dropped_seqs,
    }
    if tracker is not None:
        try:
            await asyncio.wait_for(tracker.flush(), flush_timeout)
            flushed = True
        except TimeoutError:
            flushed = False
        result["flush_end"] = time.monotonic()
        try:
            await asyncio.wait_for(tracker.aclose(), CLOSE_BOUND)
            closed = True
        except TimeoutError:
            closed = False
        result["lehnz_stats"] = tracker.stats._asdict()
    else:
        assert peer is not None
        client = peer.client
        if library == "posthog":
            flushed = await _bounded(
                lambda: client.flush(timeout_seconds=flush_timeout), flush_timeout + 5
            )
        else:
            flushed = await _bounded(client.flush, flush_timeout)
        result["flush_end"] = time.monotonic()
        closed = flushed and await _bounded(client.shutdown, CLOSE_BOUND)
        result["gave_up_seqs"] = list(peer.gave_up)  # type: ignore[attr-defined]
    result.update(
        flushed=flushed,
        closed=closed,
        close_end=time.monotonic(),
        rss_peak_bytes=rss_peak(),
        attempts=[list(a) for a in probe.attempts],
    )
    return result


# -- the orchestrator --------------------------------------------------------------------------


class Child:
    """A subprocess of this script (sink or producer): stdin and stdout are pipes,
    stderr goes to a temporary file (the libraries log a lot during an outage)."""

    def __init__(self, role: str, *args: str) -> None:
        self.role = role
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by kill()
        # The peers' own environment variables could change their wire protocol.
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTHOG_")}
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), role, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
            bufsize=0,
        )
        self._buffer = b""

    def readline(self, timeout: float) -> bytes:
        """One line of its stdout, within ``timeout`` seconds."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if (
                remaining <= 0
                or self.proc.stdout not in select.select([self.proc.stdout], [], [], remaining)[0]
            ):
                self.fail(f"said nothing within {timeout:.0f} s")
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
            if not chunk:
                self.fail("exited early")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()

    def result(self, timeout: float) -> dict[str, Any]:
        """Its last line, a JSON object, within ``timeout`` seconds; then it has exited."""
        data: dict[str, Any] = json.loads(self.readline(timeout))
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
        return data

    def tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-3000:].decode("utf-8", "replace")

    def fail(self, why: str) -> NoReturn:
        tail = self.tail()
        self.kill()
        raise RuntimeError(f"{self.role} {why}; its stderr ends with:\n{tail}")

    def kill(self) -> None:
        """Kill it if it still runs (it normally has exited); forget its stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self.stderr.close()


def run_group(libraries: Sequence[str], outage: float, opts: Options) -> dict[str, dict[str, Any]]:
    """Run ``libraries`` at the same time through one outage, each against its own sink;
    return each one's producer and sink reports."""
    children: list[Child] = []
    try:
        sinks, producers = {}, {}
        for library in libraries:
            sink = Child("_sink", "--path", PATHS[library], "--down", opts.down)
            children.append(sink)
            port = int(sink.readline(STARTUP_BOUND).split()[1])
            sinks[library] = sink
            url = f"http://127.0.0.1:{port}"
            producer = Child(
                "_producer",
                library,
                "--sink",
                url,
                "--rate",
                repr(opts.rate),
                "--flush-timeout",
                repr(opts.flush_timeout),
            )
            children.append(producer)
            producers[library] = producer
        for producer in producers.values():
            if producer.readline(STARTUP_BOUND) != b"READY":
                producer.fail("did not start")
        seconds = opts.before + outage + opts.after
        t0 = time.monotonic() + START_DELAY
        down_at, up_at = t0 + opts.before, t0 + opts.before + outage
        bound = seconds + opts.flush_timeout + CLOSE_BOUND + 60.0
        for library in libraries:
            sinks[library].send(f"GO {down_at!r} {up_at!r} {t0 + bound!r}")
            producers[library].send(f"GO {t0!r} {seconds!r} {down_at!r} {up_at!r}")
        results: dict[str, dict[str, Any]] = {}
        for library in libraries:
            remaining = t0 + bound - time.monotonic()
            results[library] = {"producer": producers[library].result(remaining)}
        for library in libraries:  # read last, so that whatever arrived late counts
            sinks[library].close_stdin()
            results[library]["sink"] = sinks[library].result(30.0)
        return results
    finally:
        for child in children:
            child.kill()


# -- figures --------------------------------------------------------------------------------------


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at one moment."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = current = 0
    for _, step in points:  # at equal times an end (-1) sorts before a start
        current += step
        most = max(most, current)
    return most


def figures(library: str, producer: dict[str, Any], sink: dict[str, Any]) -> dict[str, Any]:
    """Every figure of one library through one outage (times in seconds)."""
    arrivals = dict(zip(sink["seqs"], sink["times"], strict=True))
    tracked, down, up = producer["tracked"], sink["down_at"], sink["up_at"]
    delivered = len(arrivals)
    if library == "lehnz_async":
        stats = producer["lehnz_stats"]
        queue_full, gave_up, reported_delivered = stats["dropped"], stats["failed"], 0
    else:
        dropped_seqs, gave_up_seqs = set(producer["dropped_seqs"]), set(producer["gave_up_seqs"])
        queue_full, gave_up = len(dropped_seqs), len(gave_up_seqs)
        reported_delivered = len((dropped_seqs | gave_up_seqs) & arrivals.keys())
    dropped = queue_full + gave_up - reported_delivered
    # requests: attempts started while the endpoint was down; those still unanswered at the
    # end of the run count until then
    run_end = producer["close_end"]
    during = [
        (s, run_end if e is None else e) for s, e, _ in producer["attempts"] if down <= s < up
    ]
    # after the grace: from when lehnz_async declared the outage (it counts the grace from
    # its own first failure, which a loaded machine may see late); for the peers, GRACE s in
    declared = producer.get("outage_at")
    after_grace = [(s, e) for s, e in during if s >= (declared or down + GRACE)]
    outcomes: dict[str, int] = {}
    for _, _, outcome in (a for a in producer["attempts"] if down <= a[0] < up):
        outcomes[str(outcome)] = outcomes.get(str(outcome), 0) + 1
    before_back = producer["marks"]["up"]["tracked"]  # seqs below it were tracked before "back"
    held = [arrivals[s] for s in range(before_back) if s in arrivals and arrivals[s] >= up]
    after_back = [t for t in arrivals.values() if t >= up]
    server_down = [r for r in sink["requests"] if down <= r[0] < up]
    result: dict[str, Any] = {
        "tracked": tracked,
        "delivered": delivered,
        "lost": tracked - delivered - dropped,
        "dropped": dropped,
        "dropped_queue_full": queue_full,
        "dropped_gave_up": gave_up,
        "reported_but_delivered": reported_delivered,
        "duplicates": sink["duplicates"],
        "rejected": sink["rejected"],
        "undelivered_tracked_before_back": before_back
        - sum(1 for s in range(before_back) if s in arrivals),
        "peak_rss_mb": producer["rss_peak_bytes"] / 2**20,
        "requests_during_outage": len(during),
        "outcomes_during_outage": outcomes,
        "max_in_flight_during_outage": _max_overlap(during),
        "requests_after_grace": len(after_grace),
        "max_in_flight_after_grace": _max_overlap(after_grace),
        "server_requests_during_outage": len(server_down),
        "server_max_concurrent_during_outage": sink["max_active_down"],
        "drain_seconds": max(held) - up if held else None,
        # whether the last of it arrived only once production had stopped (the final flush)
        "drain_ended_in_flush": bool(held) and max(held) > producer["production_end"],
        "first_delivery_after_back_seconds": min(after_back) - up if after_back else None,
        "outage_seconds": up - down,
        "flushed": producer["flushed"],
        "closed": producer["closed"],
        "flush_seconds": producer["flush_end"] - producer["production_end"],
    }
    if library == "lehnz_async":
        stats, marks = producer["lehnz_stats"], producer["marks"]
        result["lehnz_stats"] = stats
        result["lehnz_requests_during_outage"] = marks["up"]["requests"] - marks["down"]["requests"]
    return result


def analyse(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {lib: figures(lib, run["producer"], run["sink"]) for lib, run in runs.items()}


# -- the plots ----------------------------------------------------------------------------------


COLORS = {"lehnz_async": "#1f77b4", "segment": "#2ca02c", "posthog": "#d62728"}


def plot(
    outage: float, down: str, rate: float, runs: dict[str, dict[str, Any]], path: Path
) -> None:
    """Cumulative events tracked and delivered over time, a panel per library, the outage
    shaded; 900x450 px."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    libraries = list(runs)
    fig, axes = plt.subplots(
        1, len(libraries), figsize=(9, 4.5), dpi=100, sharey=True, squeeze=False
    )
    for ax, library in zip(axes[0], libraries, strict=True):
        producer, sink = runs[library]["producer"], runs[library]["sink"]
        figs = figures(library, producer, sink)
        t0 = producer["t0"]
        end = max([producer["close_end"], *sink["times"]]) - t0
        grid = [i * SAMPLE_EVERY for i in range(int(end / SAMPLE_EVERY) + 2)]
        times = sorted(t - t0 for t in sink["times"])
        delivered = [bisect.bisect_right(times, g) for g in grid]
        tx = [s[0] - t0 for s in producer["samples"]] + [producer["production_end"] - t0, end]
        ty = [s[1] for s in producer["samples"]] + [producer["tracked"]] * 2
        ax.axvspan(sink["down_at"] - t0, sink["up_at"] - t0, color="0.85", lw=0, label="down")
        ax.plot(tx, ty, color="0.3", ls="--", lw=1.2, label="tracked")
        ax.plot(grid, delivered, color=COLORS.get(library, "C0"), lw=1.8, label="delivered")
        ax.set_title(library, fontsize=11)
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
        note = f"lost {figs['lost']:,}\ndropped {figs['dropped']:,}"
        if figs["drain_seconds"] is not None:
            note += f"\ndrained {figs['drain_seconds']:.1f} s after back"
        ax.text(0.03, 0.97, note, transform=ax.transAxes, va="top", fontsize=8.5)
    axes[0][0].set_ylabel("events (cumulative)")
    axes[0][0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=3, fontsize=9, frameon=False)
    kind = "connections refused" if down == "refuse" else "nginx 502"
    fig.suptitle(f"{outage:g} s outage ({kind}), {rate:g} events/s", fontsize=12, x=0.01, ha="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the report ----------------------------------------------------------------------------------

COLUMNS = (  # (header, figure, format)
    ("tracked", "tracked", "{:,}"),
    ("delivered", "delivered", "{:,}"),
    ("lost", "lost", "{:,}"),
    ("dropped", "dropped", "{:,}"),
    ("(queue full + gave up)", "dropped_split", "{}"),
    ("peak RSS MB", "peak_rss_mb", "{:.1f}"),
    ("requests during outage", "requests_during_outage", "{:,}"),
    ("max in flight", "max_in_flight_during_outage", "{}"),
    (f"max in flight after {GRACE:g} s", "max_in_flight_after_grace", "{}"),
    ("drain s", "drain_seconds", "{:.1f}"),
    ("first after back s", "first_delivery_after_back_seconds", "{:.1f}"),
)


def table_rows(summary: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for library, figs in summary.items():
        figs = {
            **figs,
            "dropped_split": f"{figs['dropped_queue_full']:,} + {figs['dropped_gave_up']:,}",
        }
        rows.append(
            [library, *("-" if figs[k] is None else fmt.format(figs[k]) for _, k, fmt in COLUMNS)]
        )
    return rows


def format_report(result: dict[str, Any]) -> str:
    env, opts = result["environment"], result["options"]
    lines = [
        "versions: "
        + " | ".join(
            [
                f"lehnz_async {env['lehnz_async']} (commit {env['commit']}"
                + (f", {env['commit_at_end']} at the end" if "commit_at_end" in env else "")
                + ")",
                *(f"{name} {version}" for name, version in env["peers"].items()),
                f"Python {env['python']}",
                f"{env['cpu_count']} CPUs",
            ]
        ),
        f"{opts['rate']:g} events/s; {opts['before']:g} s before each outage, "
        f"{opts['after']:g} s after; down = "
        + ("connections refused" if opts["down"] == "refuse" else "nginx 502 page")
        + "; libraries run "
        + ("one after the other" if opts["sequential"] else "at the same time, a sink each"),
        "",
    ]
    header = ["library", *(h for h, _, _ in COLUMNS)]
    for run in result["outages"]:
        rows = table_rows(run["summary"])
        widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
        lines.append(f"Outage {run['outage']:g} s ({run['seconds']:.0f} s of wall time)")
        for row in [header, *rows]:
            cells = (
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            lines.append("  ".join(cells))
        if run.get("plot"):
            lines.append(f"plot: {run['plot']}")
        lines.append("")
    lines += [
        "lost: tracked - delivered - dropped, events neither delivered nor reported by the library",
        "dropped: events the library reported: queue full at track(), or given up after its",
        "  retries (passed to on_error); delivered: distinct events the sink received",
        "requests during outage: attempts the producer started while the endpoint was down (a",
        "  refused connection is one), seen at its sockets; max in flight: most of them pending",
        f"  at once ('after {GRACE:g} s': of those started after the outage's first {GRACE:g} s)",
        "drain s: from 'back' until the last delivered event tracked before 'back' arrived",
        "  ('-': none was held); first after back s: until the first event arrived",
    ]
    return "\n".join(lines) + "\n"


def markdown_table(result: dict[str, Any]) -> str:
    """The report's tables as one Markdown table (for benchmarks/README.md)."""
    header = ["outage", "library", *(h for h, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in result["outages"]:
        for row in table_rows(run["summary"]):
            lines.append(f"| {run['outage']:g} s | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# -- entry points --------------------------------------------------------------------------------


def _versions(libraries: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = {"segment": "segment-analytics-python", "posthog": "posthog"}
    out = {}
    for library in libraries:
        if library in names:
            with contextlib.suppress(PackageNotFoundError):
                out[names[library]] = version(names[library])
    return out


def run(opts: Options, plots: Path | None, progress: Callable[[str], None]) -> dict[str, Any]:
    import importlib.util

    import aiohttp

    import lehnz_async

    missing = [
        lib
        for lib in opts.libraries
        if lib != "lehnz_async"
        and not all(importlib.util.find_spec(m) for m in PEERS[lib].requires)
    ]
    if missing:
        raise SystemExit(
            f"not installed: {', '.join(missing)}; run "
            "`pip install -r benchmarks/requirements.txt`, or pass --no-peers"
        )
    tree = Path(lehnz_async.__file__).resolve().parents[1]
    commit = git_commit(tree)  # each producer imports lehnz_async from this tree afresh
    outages = []
    for outage in opts.outages:
        seconds = opts.before + outage + opts.after
        groups = [[lib] for lib in opts.libraries] if opts.sequential else [list(opts.libraries)]
        progress(
            f"outage {outage:g} s: {len(groups)} run(s) of ~{seconds:.0f} s of traffic, "
            "then flush and close"
        )
        started = time.monotonic()
        runs: dict[str, dict[str, Any]] = {}
        for group in groups:
            runs.update(run_group(group, outage, opts))
        summary = analyse(runs)
        entry: dict[str, Any] = {
            "outage": outage,
            "seconds": time.monotonic() - started,
            "summary": summary,
            "raw": {lib: _raw(run) for lib, run in runs.items()},
        }
        if plots is not None:
            path = plots / f"outage-{outage:g}s.png"
            plot(outage, opts.down, opts.rate, runs, path)
            entry["plot"] = str(path)
        for lib, figs in summary.items():
            drain = figs["drain_seconds"]
            progress(
                f"  {lib}: tracked {figs['tracked']:,}, delivered {figs['delivered']:,}, "
                f"lost {figs['lost']:,}, dropped {figs['dropped']:,}, "
                f"{figs['requests_during_outage']} requests during the outage, "
                f"drain {'-' if drain is None else f'{drain:.1f} s'}"
            )
        outages.append(entry)
    environment = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "commit": commit,
        "lehnz_async": lehnz_async.__version__,
        "lehnz_async_path": str(tree / "lehnz_async"),
        "aiohttp": aiohttp.__version__,
        "msgspec": msgspec.__version__,
        "peers": _versions(opts.libraries),
    }
    if git_commit(tree) != commit:  # the code under the producers changed meanwhile
        environment["commit_at_end"] = git_commit(tree)
    return {"environment": environment, "options": opts._asdict(), "outages": outages}


def _raw(run: dict[str, Any]) -> dict[str, Any]:
    """A run's raw reports, less the per-event lists (their counts are in the summary)."""
    producer = {
        k: v for k, v in run["producer"].items() if k not in ("dropped_seqs", "gave_up_seqs")
    }
    sink = {k: v for k, v in run["sink"].items() if k not in ("seqs", "times")}
    t0 = producer["t0"]
    times = sorted(run["sink"]["times"])
    sink["delivered_per_second"] = [
        bisect.bisect_left(times, t0 + s + 1) - bisect.bisect_left(times, t0 + s)
        for s in range(int((times[-1] - t0) if times else 0) + 1)
    ]
    return {"producer": producer, "sink": sink}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_sink", "_producer"):  # the children
        _child(argv[0], argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d, add = DEFAULTS, parser.add_argument
    add("--outages", help="seconds, comma-separated (default 10,60,300)")
    add("--down", choices=DOWN_KINDS, default=d.down, help="refuse (default) or 502")
    add("--rate", type=float, default=d.rate, help="events per second (default 500)")
    add("--before", type=float, help="seconds of traffic before the outage (default 5)")
    add("--after", type=float, help="seconds of traffic after the outage (default 20)")
    add("--flush-timeout", type=float, help="most seconds a final flush may take (default 120)")
    add("--libraries", default=",".join(LIBRARIES), help=f"of {', '.join(LIBRARIES)}")
    add("--no-peers", action="store_true", help="lehnz_async alone")
    add("--sequential", action="store_true", help="one library at a time (default: all at once)")
    add("--plots", type=Path, help="directory of the PNGs (default docs/images; none with --smoke)")
    add("--no-plots", action="store_true", help="draw nothing (matplotlib not needed)")
    add("--smoke", action="store_true", help="one 4 s outage, 1 s before, 3 s after, no plots")
    add("--json", action="store_true", help="print every raw figure as JSON")
    add("--json-file", type=Path, help="also write that JSON to this file")
    args = parser.parse_args(argv)

    libraries = tuple(x for x in args.libraries.split(",") if x)
    if set(libraries) - set(LIBRARIES):
        parser.error(f"unknown libraries: {', '.join(sorted(set(libraries) - set(LIBRARIES)))}")
    if args.no_peers:
        libraries = tuple(x for x in libraries if x not in PEERS)
    if not libraries:
        parser.error("no library to run")
    base = SMOKE if args.smoke else d
    opts = base._replace(
        down=args.down, rate=args.rate, libraries=libraries, sequential=args.sequential
    )
    if args.outages is not None:
        opts = opts._replace(outages=tuple(float(x) for x in args.outages.split(",") if x))
    for name in ("before", "after", "flush_timeout"):
        if getattr(args, name) is not None:
            opts = opts._replace(**{name: getattr(args, name)})
    if not opts.outages or min(opts.outages) <= 0 or opts.rate <= 0:
        parser.error("outages and rate must be positive")
    plots = None
    if not args.no_plots:
        plots = args.plots or (None if args.smoke else SCRIPT.parents[1] / "docs" / "images")
    result = run(opts, plots, lambda message: print(message, file=sys.stderr, flush=True))
    if args.json_file:
        args.json_file.write_text(json.dumps(result))
    print(json.dumps(result) if args.json else format_report(result))


def _child(role: str, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"outage.py {role}")
    if role == "_sink":
        parser.add_argument("--path", required=True, choices=sorted(SEQS))
        parser.add_argument("--down", required=True, choices=DOWN_KINDS)
        args = parser.parse_args(argv)
        asyncio.run(serve_sink(args.path, args.down))
        return
    parser.add_argument("library", choices=LIBRARIES)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--flush-timeout", type=float, required=True)
    args = parser.parse_args(argv)
    result = asyncio.run(produce(args.library, args.sink, args.rate, args.flush_timeout))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the peers' atexit hooks (a flush that timed out would wait again there).
    os._exit(0)


if __name__ == "__main__":
    main()
