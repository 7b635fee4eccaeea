"""A fast ingestion sink for the benchmarks, meant to run in its own process.

    python benchmarks/sink.py [--host 127.0.0.1] [--port 0] [--exit-on-stdin-eof]
    python benchmarks/sink.py --decoders    # times the ways of counting events, then exits

It answers the ingestion requests of every driver in their own formats (`FORMATS`: one
entry per path, each answered as its server does on success), counts their events and
forgets them. A POST to any other path is answered 404 and counted as rejected, so that a
client pointed at a path the sink does not know cannot go unnoticed. Bodies with
``Content-Encoding: gzip`` or ``deflate`` are decompressed by aiohttp before they are
counted; the byte counters keep the size on the wire. ``GET /count`` returns what it has
counted (`Counts`), ``POST /reset`` zeroes it. It prints ``READY <port>`` on stdout
(flushed) once it listens, then nothing else there.

Counting: each body is decoded with a msgspec decoder of its path's envelope whose events
are `_Object`, a struct with no fields: msgspec validates the JSON and its shape but skips
every field without building it (see `compare_decoders` and benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

INGEST_PATH = "/api/v1/events/ingest"
KEY_PREFIX = "lehnz_pk_"


class _Object(msgspec.Struct, gc=False):
    """Any JSON object: every field is unknown, hence skipped (validated, not built)."""


class _SegmentBatch(msgspec.Struct, gc=False):
    """Segment's body: ``{"batch": [...], "sentAt": ..., "writeKey": ...}``."""

    batch: list[_Object]
    writeKey: str  # the wire name


class _PostHogBatch(msgspec.Struct, gc=False):
    """PostHog's ``/batch/`` body, from posthog.Posthog and posthog.AsyncPosthog alike:
    ``{"batch": [...], "api_key": ..., "sent_at": ..., "historical_migration": ...}``."""

    batch: list[_Object]
    api_key: str


class _PostHogCapture(msgspec.Struct, gc=False):
    """A ``/i/v0/e/`` object body: ``{"batch": [...]}``, or one event (no ``batch``)."""

    batch: list[_Object] | None = None


def _batch_size(decoded: Any) -> int:
    """Events of a decoded body: an array, an envelope with a batch, or one event."""
    if isinstance(decoded, list):
        return len(decoded)
    return 1 if decoded.batch is None else len(decoded.batch)


class Format(NamedTuple):
    decode: Callable[[bytes], Any]  # raises msgspec.DecodeError on a body not in the format
    status: int  # of the answer on success
    answer: Callable[[int], bytes]  # its body, from the number of events
    error: bytes  # the body of the 400 answer to a body not in the format


_ERROR = b'{"error":"Malformed JSON"}'
_POSTHOG_OK = b'{"status":1}'
#: path -> its format. Success is 202 for lehnz_async's endpoint; 200 for Segment's
#: (analytics-python accepts any 2xx) and PostHog's (posthog-python treats anything else,
#: 202 included, as a failure).
FORMATS = {
    INGEST_PATH: Format(
        msgspec.json.Decoder(list[_Object]).decode, 202, lambda n: b'{"accepted":%d}' % n, _ERROR
    ),
    # segment/analytics/request.py: host + "/v1/batch"
    "/v1/batch": Format(
        msgspec.json.Decoder(_SegmentBatch).decode,
        200,
        lambda n: b'{"success":true}',
        b'{"code":"invalid_request","message":"Malformed JSON"}',
    ),
    # posthog/request.py: EVENTS_ENDPOINT = "/batch/" (both clients' capture_mode v0)
    "/batch/": Format(
        msgspec.json.Decoder(_PostHogBatch).decode, 200, lambda n: _POSTHOG_OK, _ERROR
    ),
    # PostHog's capture endpoint, used by other SDKs
    "/i/v0/e/": Format(
        msgspec.json.Decoder(list[_Object] | _PostHogCapture).decode,
        200,
        lambda n: _POSTHOG_OK,
        _ERROR,
    ),
}
_decode_events = FORMATS[INGEST_PATH].decode


class Counts(msgspec.Struct):
    """What ``GET /count`` returns."""

    #: Events in accepted (2xx) requests.
    events: int = 0
    #: Body bytes of accepted requests, as on the wire (compressed if they were).
    bytes: int = 0
    #: Bytes of the request line and headers of accepted requests (CRLFs included).
    header_bytes: int = 0
    #: Accepted requests.
    requests: int = 0
    #: Requests answered 400, 401 or 404.
    rejected: int = 0
    #: Requests whose connection was lost before their body was read (a client that
    #: exited mid-request: compare.py's latency runs leave the peers that way).
    aborted: int = 0
    #: Events per path of accepted requests.
    by_path: dict[str, int] = msgspec.field(default_factory=dict)
    #: CPU seconds the sink process has used since it started (never reset): the
    #: difference between two readings shows how busy it was in between.
    cpu_seconds: float = 0.0


_encode = msgspec.json.Encoder().encode
_JSON = "application/json"


def header_size(request: web.BaseRequest) -> int:
    """Bytes of the request line and headers, rebuilt from what aiohttp parsed."""
    # "POST /path HTTP/1.1\r\n", then "Name: value\r\n" per header, then "\r\n"
    size = len(request.method) + len(request.raw_path) + 14
    for name, value in request.raw_headers:
        size += len(name) + len(value) + 4
    return size


class Sink:
    """The counters and the handlers; `app()` wires them into an application."""

    def __init__(self) -> None:
        self.counts = Counts()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for path in FORMATS:
            app.router.add_post(path, self.ingest)
        app.router.add_get("/count", self.count)
        app.router.add_post("/reset", self.reset)
        app.router.add_post("/{tail:.*}", self.unknown)
        return app

    async def ingest(self, request: web.Request) -> web.Response:
        """Read the body and count its events, in the format of its path."""
        counts, form = self.counts, FORMATS[request.path]
        key = request.headers.get("X-API-KEY", "")
        if request.path == INGEST_PATH and not key.startswith(KEY_PREFIX):
            counts.rejected += 1
            return web.json_response({"error": "Missing or invalid X-API-KEY"}, status=401)
        try:
            body = await request.read()  # decompressed if Content-Encoding says so
            n = _batch_size(form.decode(body))
        except (ConnectionResetError, msgspec.DecodeError) as error:
            # the client went away mid-body, or the body is not in the path's format
            # (msgspec's ValidationError, not the expected shape, included)
            if isinstance(error, ConnectionResetError):
                counts.aborted += 1
            else:
                counts.rejected += 1
            return web.Response(status=400, body=form.error, content_type=_JSON)
        counts.events += n
        wire = request.content_length
        counts.bytes += len(body) if wire is None else wire
        counts.header_bytes += header_size(request)
        counts.requests += 1
        counts.by_path[request.path] = counts.by_path.get(request.path, 0) + n
        return web.Response(status=form.status, body=form.answer(n), content_type=_JSON)

    async def unknown(self, request: web.Request) -> web.Response:
        self.counts.rejected += 1
        return web.json_response({"error": f"the sink does not serve {request.path}"}, status=404)

    async def count(self, request: web.Request) -> web.Response:
        self.counts.cpu_seconds = time.process_time()
        return web.Response(body=_encode(self.counts), content_type=_JSON)

    async def reset(self, request: web.Request) -> web.Response:
        self.counts = Counts()
        return await self.count(request)


async def _stdin_eof() -> None:
    """Return once stdin reaches end of file (the parent closed its end of the pipe)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


async def serve(host: str, port: int, exit_on_stdin_eof: bool) -> None:
    """Listen, print ``READY <port>``, and serve until SIGINT/SIGTERM (or stdin's EOF)."""
    runner = web.AppRunner(Sink().app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, shutdown_timeout=0.5)
    await site.start()
    bound_port = runner.addresses[0][1]
    print(f"READY {bound_port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
    if exit_on_stdin_eof:
        waiters.append(asyncio.create_task(_stdin_eof()))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await runner.cleanup()


def compare_decoders(n_events: int = 500, number: int = 500, repeat: int = 7) -> dict[str, float]:
    """Microseconds to count the events of one array of ``n_events`` of the benchmark's
    events, as lehnz_async sends them, per way (best of ``repeat`` runs of ``number``)."""
    import json

    from drivers import FAMILIES, make_stream

    from lehnz_async import Event

    stream = zip(*make_stream(0, n_events), strict=True)
    body = msgspec.json.encode([Event(u, FAMILIES[e], e, i, context=c) for u, e, i, c in stream])
    raw_decode = msgspec.json.Decoder(list[msgspec.Raw]).decode
    any_decode = msgspec.json.Decoder().decode
    ways: dict[str, Callable[[], Any]] = {
        "list[_Object] (used)": lambda: _decode_events(body),
        "list[msgspec.Raw]": lambda: raw_decode(body),
        "msgspec.json.decode": lambda: any_decode(body),
        "json.loads": lambda: json.loads(body),
    }
    for way in ways.values():
        assert len(way()) == n_events
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(repeat):  # interleaved, so that a noisy moment hits every way alike
        for name, way in ways.items():
            best[name] = min(best[name], timeit.timeit(way, number=number) / number * 1e6)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=0, help="0 (default): an ephemeral port")
    add("--exit-on-stdin-eof", action="store_true", help="stop when stdin is closed")
    add("--decoders", action="store_true", help="time the ways of counting events, then exit")
    args = parser.parse_args(argv)
    if args.decoders:
        for name, us in compare_decoders().items():
            print(f"{name:24s} {us:8.1f} µs per 500-event array")
        return
    asyncio.run(serve(args.host, args.port, args.exit_on_stdin_eof))


if __name__ == "__main__":
    main()
