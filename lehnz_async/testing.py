"""The reference ingestion server: the documented contract, in memory, on loopback.

`ReferenceServer` implements ``POST /api/v1/events/ingest`` exactly as documented
(``202``; ``400 Missing mandatory fields`` / ``Invalid event_family``; ``401 Missing or
invalid X-API-KEY``; ``403 Secret keys prohibited on public endpoints``; one event object
or an array) and ``POST /recommend`` (popularity over what it has ingested). Where the
documentation is silent it chooses, and says so here:

- a body over ``max_body_size`` bytes (default 1 MiB) gets ``413``, decided from
  ``Content-Length`` before the body is read, or as soon as the bound is passed while a
  chunked body streams in; a body that has not arrived ``client_timeout`` seconds after
  its headers gets ``408``;
- ``Content-Encoding: gzip`` (or ``deflate``) bodies are inflated, at most to
  ``max_body_size`` bytes (more: ``413``); a corrupt stream gets ``400 Malformed JSON``;
  other encodings get ``415``;
- a body that is not JSON (invalid UTF-8 in a string, nesting too deep for the decoder,
  truncated, ...), or not an event object or an array of them, gets
  ``400 Malformed JSON``; an event whose ``user_id``, ``event_family`` or ``event_name``
  is not a non-empty string gets ``400 Missing mandatory fields``; never a ``500``;
- one bad event rejects the whole array;
- errors are JSON ``{"error": "<message>"}``; ``202`` answers ``{"accepted": <n>}``;
- a request whose ``Idempotency-Key`` was already accepted is answered ``202`` again
  without storing its events twice, and counted in `ReferenceServer.duplicates`.

A `FaultPlan` makes it misbehave on purpose (statuses with ``Retry-After``, latency,
dropped connections, rejected events, a proxy's body limit), and `ReferenceServer.outage`
takes it down for a while (connections refused, or a proxy's ``502``/``503`` page), so a
client's tests run over real HTTP.

Usage::

    async with ReferenceServer() as server:
        async with Tracker(server.api_key, endpoint=server.url) as tracker:
            tracker.track("usr_1", "view", item_id="prod_1")
        assert server.events[0]["item_id"] == "prod_1"
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import re
import socket
import ssl
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, NoReturn

import msgspec
from aiohttp import web

from ._inspector import Inspector, host_name

__all__ = [
    "DEFAULT_TEST_KEY",
    "Fault",
    "FaultPlan",
    "Outage",
    "OutageKind",
    "ReferenceServer",
    "RequestRecord",
    "assert_tracked",
    "nginx_page",
]

if TYPE_CHECKING:
    from ._event import Event
    from ._tracker import Tracker

logger = logging.getLogger("lehnz_async.testing")

#: The publishable key a server accepts when it is given no key list.
DEFAULT_TEST_KEY = "lehnz_pk_test"
INGEST_PATH = "/api/v1/events/ingest"
RECOMMEND_PATH = "/recommend"
DEFAULT_MAX_BODY_SIZE = 1024 * 1024
DEFAULT_BACKLOG = 1024
#: Content-Encoding -> zlib's wbits for it.
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

FAMILIES = frozenset({"exposure", "engagement", "conversion", "system"})
_PUBLISHABLE = re.compile(r"lehnz_pk_[A-Za-z0-9_\-]+")

#: How `ReferenceServer.outage` takes the server down: ``"refuse"`` stops listening
#: (connection attempts are refused at TCP level), ``"502"`` and ``"503"`` answer every
#: request with a proxy's HTML error page.
OutageKind = Literal["refuse", "502", "503"]
_OUTAGE_KINDS = ("refuse", "502", "503")
_REASONS = {
    413: "Request Entity Too Large",
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
}


def nginx_page(status: int) -> bytes:
    """The HTML error page nginx sends for ``status`` (413, 502 or 503), byte for byte."""
    title = f"{status} {_REASONS[status]}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


def _nginx_response(status: int) -> web.Response:
    return web.Response(
        status=status, reason=_REASONS[status], body=nginx_page(status), content_type="text/html"
    )


class Outage(NamedTuple):
    """One outage of a `ReferenceServer`, in the loop's time (``loop.time()``)."""

    kind: OutageKind
    #: When it began.
    start: float
    #: When it ended; None while it lasts.
    end: float | None


@dataclasses.dataclass
class Fault:
    """One misbehaviour, for one request.

    Attributes:
        status: The status to answer (ignored when ``drop_connection``).
        retry_after: The ``Retry-After`` header to send, as written (seconds or a date).
        message: The JSON ``error`` message; a default names the status.
        delay: Seconds to wait before answering (beyond a client's timeout: a timeout).
        drop_connection: Close the connection without answering.
        plain_text: Send the message as text/plain instead of JSON.
        process: Handle the request normally first (store its events), then misbehave:
            ``delay`` makes the answer late, ``drop_connection`` loses it; the client
            cannot tell that its events arrived, and a retry is a duplicate.
        body: Raw bytes to answer instead of a message (a proxy's HTML or Latin-1
            page, a truncated or 100,000-deep JSON document), as ``text/html``.
    """

    status: int = 503
    retry_after: str | None = None
    message: str | None = None
    delay: float = 0.0
    drop_connection: bool = False
    plain_text: bool = False
    process: bool = False
    body: bytes | None = None


@dataclasses.dataclass
class FaultPlan:
    """How a `ReferenceServer` misbehaves; change it at any time, even mid-test.

    Attributes:
        latency: Seconds added before every answer.
        max_body_size: Bodies larger than this get 413 (JSON, from the server itself).
        proxy_body_limit: A proxy's body limit in front of the server (nginx's
            ``client_max_body_size``): bodies larger than this get nginx's HTML
            ``413 Request Entity Too Large``, decided from ``Content-Length`` before the
            body is read when the request has one, else once the bound is passed while
            reading. None: no proxy.
        reject_event: Called with each event of a valid request; a returned string
            rejects the request with ``400`` and that message (one bad event rejects
            the array, as the contract assumes).
        random_faults: ``(probability, Fault)`` pairs drawn for each ingest request
            (after any queued fault), with ``seed`` for repeatable runs.
        fail_event: Called with each event of a valid request; a returned status (500,
            say) answers the whole request with it, storing nothing: a server bug that
            one payload triggers every time (a poison event).
    """

    latency: float = 0.0
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    proxy_body_limit: int | None = None
    reject_event: Callable[[dict[str, Any]], str | None] | None = None
    fail_event: Callable[[dict[str, Any]], int | None] | None = None
    random_faults: list[tuple[float, Fault]] = dataclasses.field(default_factory=list)
    seed: int | None = None
    _queued: collections.deque[Fault] = dataclasses.field(
        default_factory=collections.deque, repr=False
    )
    _rng: random.Random = dataclasses.field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        *,
        retry_after: str | None = None,
        message: str | None = None,
        delay: float = 0.0,
        drop_connection: bool = False,
        plain_text: bool = False,
        process: bool = False,
        body: bytes | None = None,
    ) -> None:
        """Make the next ``n`` ingest requests fail this way (see `Fault`)."""
        fault = Fault(
            status, retry_after, message, delay, drop_connection, plain_text, process, body
        )
        self._queued.extend([fault] * n)

    def next_fault(self) -> Fault | None:
        """The fault for the request arriving now, if any (queued first, then random)."""
        if self._queued:
            return self._queued.popleft()
        if self.random_faults:
            draw = self._rng.random()
            for probability, fault in self.random_faults:
                if draw < probability:
                    return fault
                draw -= probability
        return None


@dataclasses.dataclass
class RequestRecord:
    """One ingest request as the server saw it."""

    #: time.monotonic() when it arrived.
    received_at: float
    #: The answer's status (0 when the connection was dropped, or cut by an outage,
    #: before the answer was sent).
    status: int
    #: Events it carried if they were parsed (0 otherwise).
    n_events: int
    #: The raw body, as on the wire (still gzipped if it was); empty when it was refused
    #: before it was read, or when the server keeps no bodies (``keep_bodies=False``).
    body: bytes
    headers: dict[str, str]
    #: time.monotonic() when it was answered (or dropped).
    answered_at: float = 0.0
    #: The peer's address, if known.
    remote: str | None = None
    #: Bytes of the body as sent: as read, else as its ``Content-Length`` announced (a body
    #: refused before it was read); 0 when not known. Kept with ``keep_bodies=False`` too.
    body_size: int = 0
    #: The answer's message: the ``error`` of its JSON, the title of a proxy's HTML page;
    #: None for a ``202`` or no answer.
    message: str | None = None
    #: Answered ``202`` again for an ``Idempotency-Key`` already accepted (nothing stored).
    duplicate: bool = False
    #: Events in the body, where it could be read and decoded; None otherwise.
    batch_size: int | None = None
    #: For a ``400``: the event refused, where known (the one a `FaultPlan.reject_event`
    #: refused, or the first that fails validation); None otherwise.
    refused_event: Any = None

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("Idempotency-Key")

    @property
    def refused(self) -> bool:
        """Answered other than ``2xx``, or not at all (status 0)."""
        return not 200 <= self.status < 300


_JSON = msgspec.json.Decoder()
# what a body that is not JSON raises: msgspec.DecodeError (a ValueError only from msgspec
# 0.23 on), ValueError on invalid UTF-8, RecursionError on deep nesting
_UNDECODABLE = (msgspec.DecodeError, ValueError, RecursionError)


class ReferenceServer:
    """The ingestion contract on an ephemeral loopback port, as an async context manager.

    Args:
        api_keys: Keys it accepts; None accepts any well-formed ``lehnz_pk_...`` key.
            `revoke()` refuses one later.
        faults: How to misbehave (see `FaultPlan`); change ``server.faults`` any time.
        host: The address to listen on (loopback by default).
        port: 0 for an ephemeral port.
        log_requests: Log each request at INFO on ``lehnz_async.testing``.
        keep: Hold only the last ``keep`` events and requests (`events`, `requests`),
            and remember the ``Idempotency-Key`` of only the last ``keep`` accepted
            requests (least recently seen forgotten first), so that a server that runs
            for long keeps its memory bounded. None keeps everything (for tests).
        keep_bodies: Keep each request's raw body in `requests` (``RequestRecord.body``).
        client_timeout: Seconds a client has to send a request's body once its headers
            arrived (then ``408``), and to send the next request on an idle
            keep-alive connection (then the connection is closed). None: no limit.
        backlog: The listen backlog (connections the kernel completes before the
            server accepts them).

    Outages (`outage`, `restore`, `is_down`, `outages`) take the whole server down for a
    while, on the loop's clock, so they work on virtual time too::

        await server.outage("refuse", 2.0)  # back by itself 2 s later, on the same port
        await server.outage("503")          # until `await server.restore()`
    """

    def __init__(
        self,
        api_keys: set[str] | None = None,
        *,
        faults: FaultPlan | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        log_requests: bool = False,
        keep: int | None = None,
        keep_bodies: bool = True,
        client_timeout: float | None = None,
        backlog: int = DEFAULT_BACKLOG,
        ssl_context: ssl.SSLContext | None = None,
        allow_hosts: Iterable[str] = (),
    ) -> None:
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be a positive int or None, not {keep!r}")
        if client_timeout is not None and not client_timeout > 0:
            raise ValueError(f"client_timeout must be > 0 or None, not {client_timeout!r}")
        self.api_keys = api_keys
        self.faults = faults or FaultPlan()
        self.host = host
        self.port = port
        self.log_requests = log_requests
        self.keep = keep
        self.keep_bodies = keep_bodies
        self.client_timeout = client_timeout
        #: Serve HTTPS with this context (tests of a client's TLS settings).
        self.ssl_context = ssl_context
        #: Host names the inspector answers to beyond loopback's and ``host`` (its page and
        #: API refuse any other ``Host`` header with 403: a DNS-rebinding defence). The
        #: ingestion and recommend endpoints answer whatever the ``Host``.
        self.allow_hosts = frozenset(host_name(name) for name in allow_hosts)
        self.revoked: set[str] = set()
        #: Every accepted event, in arrival order, as decoded JSON objects.
        self.events: list[dict[str, Any]] = []
        #: Every ingest request, in arrival order.
        self.requests: list[RequestRecord] = []
        #: Requests answered 202 again because their Idempotency-Key was already accepted.
        self.duplicates = 0
        #: Ingest requests being handled right now, and the most at any moment.
        self.in_flight = 0
        self.max_in_flight = 0
        #: recommendation_id -> the item ids it returned (the last ``keep``).
        self.recommendations: collections.OrderedDict[str, list[str]] = collections.OrderedDict()
        #: Every outage so far, oldest first; the last one has ``end=None`` while it lasts.
        self.outages: list[Outage] = []
        # Idempotency-Keys of accepted requests, least recently seen first
        self._accepted_keys: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._popularity: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._sites: list[web.BaseSite] = []
        # while connections are refused: each address listened on, and the socket that
        # keeps it bound (not listening), or None if it could not be kept
        self._held: list[tuple[Any, socket.socket | None]] = []
        self._outage: Outage | None = None
        self._outage_lock = asyncio.Lock()
        self._restore_at: asyncio.TimerHandle | None = None
        self._restoring: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()  # ingest requests in progress
        self._backlog = backlog
        self._subscribers: list[_Subscriber] = []
        self._stored: dict[int, list[dict[str, Any]]] = {}  # by id() of a request's record
        #: The event inspector: the page at ``/`` and its JSON API (``lehnz_async._inspector``).
        self.inspector = Inspector(self)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> ReferenceServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen; `url` is valid afterwards."""
        app = web.Application(client_max_size=1024**3)
        app.router.add_post(INGEST_PATH, self._ingest)
        app.router.add_post(RECOMMEND_PATH, self._recommend)
        self.inspector.install(app)
        options: dict[str, Any] = {}
        if self.client_timeout is not None:
            options["keepalive_timeout"] = self.client_timeout
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=0.1,
            auto_decompress=False,  # inflated here, with a bound
            **options,
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, backlog=self._backlog, ssl_context=self.ssl_context
        )
        await site.start()
        self._sites = [site]
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening and close every connection (an outage in progress ends)."""
        if self._restore_at is not None:
            self._restore_at.cancel()
            self._restore_at = None
        for task in list(self._restoring):
            task.cancel()
        if self._restoring:
            await asyncio.gather(*self._restoring, return_exceptions=True)
        self._release_port()
        if self._outage is not None:
            self._end_outage_record()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._sites = []

    @property
    def base_url(self) -> str:
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The ingestion endpoint, to pass as ``Tracker(endpoint=...)``."""
        return self.base_url + INGEST_PATH

    @property
    def recommend_url(self) -> str:
        return self.base_url + RECOMMEND_PATH

    @property
    def api_key(self) -> str:
        """A key this server accepts."""
        if self.api_keys:
            usable = sorted(self.api_keys - self.revoked) or sorted(self.api_keys)
            return usable[0]
        return DEFAULT_TEST_KEY

    def revoke(self, key: str) -> None:
        """Answer 401 to ``key`` from now on."""
        self.revoked.add(key)

    # -- what it holds, for tools -----------------------------------------------------------

    @property
    def refused(self) -> list[RequestRecord]:
        """The refused ingest requests among `requests` (answered other than ``2xx``, or
        not at all), oldest first."""
        return [record for record in self.requests if record.refused]

    def reset(self) -> None:
        """Forget what the server holds: `events`, `requests`, `duplicates`, the
        ``Idempotency-Key``s seen, `recommendations` and the popularity behind them. Its
        `FaultPlan`, revoked keys and outages stay as they are. Subscribers hear of it."""
        self.events.clear()
        self.requests.clear()
        self.duplicates = 0
        self.recommendations.clear()
        self._accepted_keys.clear()
        self._popularity.clear()
        logger.info("reset: the server holds nothing")
        for subscriber in list(self._subscribers):
            if subscriber.on_reset is not None:
                _call(subscriber.on_reset)
        self.notify()

    def subscribe(
        self,
        on_request: Callable[[RequestRecord, list[dict[str, Any]]], None],
        on_reset: Callable[[], None] | None = None,
    ) -> Callable[[], None]:
        """Hear of each ingest request as it is answered, and of each `reset`.

        Args:
            on_request: Called with the request's `RequestRecord`, complete (status,
                message, batch size, refused event...; its body still there), and the
                events it stored (empty unless accepted), once it is answered or dropped.
            on_reset: Called after `reset()`.

        Both are called on the server's loop and must not block; what they raise is
        logged, never passed on to the client.

        Returns:
            A function that unsubscribes.
        """
        subscriber = _Subscriber(on_request, on_reset)
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    # -- outages --------------------------------------------------------------------------

    @property
    def is_down(self) -> bool:
        """Whether an outage is in progress."""
        return self._outage is not None

    async def outage(self, kind: OutageKind, seconds: float | None = None) -> None:
        """Take the server down now; return at once, with the outage in effect.

        Args:
            kind: ``"refuse"``: as if the process went away: stop listening, close every
                open connection, and end the requests in progress unanswered and
                unprocessed (recorded with status 0); connection attempts are refused at
                TCP level until the server listens again, on the same port. ``"502"`` or
                ``"503"``: answer every request (ingest and recommend) with nginx's
                HTML ``502 Bad Gateway`` or ``503 Service Temporarily Unavailable`` page,
                like a proxy whose upstream is down.
            seconds: How long it lasts, on the loop's clock (``loop.time()``, so virtual
                time moves it too); the server comes back by itself. None: until
                `restore()`.

        An outage started while another lasts replaces it (the first one ends now).
        Requests answered during an outage are in `requests` as usual; refused
        connections never reach the server and are not recorded. Each outage is in
        `outages` as ``(kind, start, end)``. To wait for the end of a timed outage:
        ``await server.wait_for(lambda: not server.is_down)``.

        Raises:
            ValueError: an unknown ``kind``, or a negative ``seconds``.
            RuntimeError: the server is not started.
        """
        if kind not in _OUTAGE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(_OUTAGE_KINDS)}, not {kind!r}")
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"seconds must be >= 0 or None, not {seconds!r}")
        if self._runner is None:
            raise RuntimeError("the server is not started")
        loop = asyncio.get_running_loop()
        async with self._outage_lock:
            previous = self._outage
            await self._end_outage(record=False)
            if kind == "refuse":
                await self._stop_listening()
            outage = Outage(kind, loop.time(), None)
            if previous is not None:  # it ends when this one begins
                self._outage = previous
                self._end_outage_record(outage.start)
            self._outage = outage
            self.outages.append(outage)
            if seconds is not None:
                self._restore_at = loop.call_at(outage.start + seconds, self._auto_restore, outage)
        logger.info("outage (%s) for %s", kind, "ever" if seconds is None else f"{seconds} s")
        self._notify()

    async def restore(self) -> None:
        """End the outage in progress, if any: listen again (same port) and answer normally.

        Raises:
            OSError: the port was taken by another process while connections were refused.
        """
        async with self._outage_lock:
            await self._end_outage()
        self._notify()

    def _auto_restore(self, outage: Outage) -> None:
        """The timer of a timed outage: back now (a 502/503 outage at once; a refused port
        accepts connections at once, and they are served once the server is attached)."""
        self._restore_at = None
        if self._outage is not outage:
            return
        if outage.kind != "refuse":
            self._end_outage_record()
            logger.info("outage (%s) over", outage.kind)
            self._notify()
            return
        for _, sock in self._held:
            if sock is not None:
                sock.listen(self._backlog)
        task = asyncio.get_running_loop().create_task(self._restore_if(outage))
        self._restoring.add(task)
        task.add_done_callback(self._restoring.discard)

    async def _restore_if(self, outage: Outage) -> None:
        async with self._outage_lock:
            if self._outage is outage:  # not replaced or restored meanwhile
                await self._end_outage()
        self._notify()

    async def _end_outage(self, record: bool = True) -> None:
        """Under the lock: undo the outage in progress, if any (and ``record`` its end)."""
        if self._restore_at is not None:
            self._restore_at.cancel()
            self._restore_at = None
        outage = self._outage
        if outage is None:
            return
        if outage.kind == "refuse":
            await self._listen_again()
        if record:
            self._end_outage_record()
        else:
            self._outage = None
        logger.info("outage (%s) over", outage.kind)

    def _end_outage_record(self, end: float | None = None) -> None:
        assert self._outage is not None
        if end is None:
            end = asyncio.get_running_loop().time()
        index = len(self.outages) - 1 - self.outages[::-1].index(self._outage)
        self.outages[index] = self._outage._replace(end=end)
        self._outage = None

    async def _stop_listening(self) -> None:
        """Close the listening sockets, keep the port bound (not listening), and cut
        every open connection, as if the server process had gone away."""
        runner = self._runner
        assert runner is not None
        addresses = list(runner.addresses)
        for site in self._sites:
            await site.stop()
        self._sites = []
        for address in addresses:
            try:
                self._held.append((address, _hold_port(address)))
            except OSError:  # taken at once by someone else: try again at restore
                self._held.append((address, None))
        if runner.server is not None:
            for connection in runner.server.connections:
                connection.force_close()
        for task in self._handlers:  # requests in progress end unanswered (status 0)
            task.cancel()

    async def _listen_again(self) -> None:
        runner = self._runner
        assert runner is not None
        while self._held:
            address, sock = self._held[0]
            site = web.SockSite(
                runner,
                sock or _hold_port(address),
                backlog=self._backlog,
                ssl_context=self.ssl_context,  # back as it was: HTTPS stays HTTPS
            )
            await site.start()  # asyncio calls listen() on the socket
            self._sites.append(site)
            del self._held[0]

    def _release_port(self) -> None:
        for _, sock in self._held:
            if sock is not None:
                sock.close()
        self._held = []

    # -- waiting, for tests ---------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Return once ``predicate()`` holds, re-checked after every request.

        Raises:
            TimeoutError: it did not hold within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s")
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                continue

    async def wait_for_events(self, n: int, timeout: float = 10.0) -> None:
        """Return once at least ``n`` events were accepted."""
        await self.wait_for(lambda: len(self.events) >= n, timeout)

    def notify(self) -> None:
        """Make `wait_for` check its predicate again now: for state that changes outside
        the server's requests (an inspector stream opening or closing)."""
        self._changed.set()
        self._changed = asyncio.Event()

    _notify = notify

    # -- handlers -------------------------------------------------------------------------

    def _check_key(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("X-API-KEY", "")
        if key.startswith("lehnz_sk_"):
            return _error(403, "Secret keys prohibited on public endpoints")
        valid = (
            key in self.api_keys if self.api_keys is not None else bool(_PUBLISHABLE.fullmatch(key))
        )
        if not valid or key in self.revoked:
            return _error(401, "Missing or invalid X-API-KEY")
        return None

    async def _ingest(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._notify()
        record = RequestRecord(
            time.monotonic(), 0, 0, b"", dict(request.headers), remote=request.remote
        )
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        response: web.StreamResponse | None = None
        try:
            response = await self._answer(request, record)
            record.status = response.status
            return response
        finally:
            self._handlers.discard(task)
            record.answered_at = time.monotonic()
            self.in_flight -= 1
            stored = self._stored.pop(id(record), None)
            try:
                _describe(request, record, response, stored, self.faults.max_body_size)
            except Exception as exc:  # never let a description break the contract
                logger.error("could not describe request: %r", exc)
            for subscriber in list(self._subscribers):
                _call(subscriber.on_request, record, stored or [])
            if not self.keep_bodies:
                record.body = b""
            self.requests.append(record)
            if self.keep is not None and len(self.requests) > self.keep:
                del self.requests[: -self.keep]
            if self.log_requests:
                logger.info(
                    "%s %d events -> %s", request.remote, record.n_events, record.status or "drop"
                )
            self._notify()

    async def _answer(self, request: web.Request, record: RequestRecord) -> web.Response:
        plan = self.faults
        if self._outage is not None and self._outage.kind == "refuse":
            _abort(request)  # a connection opened before the outage
        body = await self._read_body(request)
        if isinstance(body, web.Response):  # too large
            if body.content_type == "text/html" or body.status == 408:  # no latency for these
                return body
            if plan.latency:
                await asyncio.sleep(plan.latency)
            return body
        record.body = body
        refused = self._front(request)
        if refused is not None:
            return refused
        if plan.latency:
            await asyncio.sleep(plan.latency)
        fault = plan.next_fault()
        if fault is None:
            return self._process(request, record)
        if fault.process:
            response = self._process(request, record)
        elif fault.body is not None:
            response = web.Response(status=fault.status, body=fault.body, content_type="text/html")
        else:
            response = _error(
                fault.status, fault.message or f"injected {fault.status}", fault.plain_text
            )
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.drop_connection:
            _abort(request)
        if fault.retry_after is not None and not fault.process:
            response.headers["Retry-After"] = fault.retry_after
        return response

    def _front(self, request: web.Request) -> web.Response | None:
        """What stands in front of the server during an outage, once it read the body:
        nothing (the connection is cut), or a proxy's 502/503 page."""
        outage = self._outage
        if outage is None:
            return None
        if outage.kind == "refuse":
            _abort(request)
        return _nginx_response(int(outage.kind))

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        """The body, or the 413 answer: the proxy's HTML page over ``proxy_body_limit``,
        the server's JSON error over ``max_body_size``; decided from ``Content-Length``
        before reading when there is one, else as soon as the bound is passed."""
        plan = self.faults
        proxy, limit = plan.proxy_body_limit, plan.max_body_size
        length = request.content_length
        if length is not None:
            if proxy is not None and length > proxy:
                return _nginx_response(413)
            if length > limit:
                return _too_large(limit)
        bound = limit if proxy is None else min(limit, proxy)
        chunks: list[bytes] = []
        size = 0
        read = request.content.readany
        timeout = self.client_timeout
        deadline = 0.0 if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            if timeout is None:
                chunk = await read()
            else:
                try:
                    remaining = deadline - asyncio.get_running_loop().time()
                    chunk = await asyncio.wait_for(read(), max(remaining, 0.0))
                except asyncio.TimeoutError:  # answer, then cut off: no more is awaited
                    response = _error(408, f"Request Timeout: no body within {timeout} s")
                    response.force_close()
                    await response.prepare(request)
                    await response.write_eof()
                    if request.transport is not None and request.transport.can_write_eof():
                        request.transport.write_eof()
                    return response
            if not chunk:
                break
            size += len(chunk)
            if size > bound:  # the rest is read and discarded by aiohttp, then closed
                if proxy is not None and size > proxy:
                    return _nginx_response(413)
                return _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def _process(self, request: web.Request, record: RequestRecord) -> web.Response:
        """The contract itself: key rules, de-duplication, validation, storage."""
        plan = self.faults
        refused = self._check_key(request)
        if refused is not None:
            return refused
        key = request.headers.get("Idempotency-Key")
        accepted = self._accepted_keys
        if key is not None and key in accepted:
            accepted.move_to_end(key)
            self.duplicates += 1
            return web.json_response({"accepted": 0, "duplicate": True}, status=202)
        body = _inflate(request, record.body, plan.max_body_size)
        if isinstance(body, web.Response):
            return body
        events = _decode_events(body)
        if isinstance(events, str):
            return _error(400, events)
        if plan.fail_event is not None:
            for event in events:
                status = plan.fail_event(event)
                if status is not None:
                    return _error(status, "internal error (a poison event)")
        if plan.reject_event is not None:
            for event in events:
                reason = plan.reject_event(event)
                if reason is not None:
                    record.refused_event = event
                    return _error(400, reason)
        keep = self.keep
        if key is not None:
            accepted[key] = None
            if keep is not None and len(accepted) > keep:
                accepted.popitem(last=False)
        self.events.extend(events)
        self._stored[id(record)] = events
        if keep is not None and len(self.events) > keep:
            del self.events[:-keep]
        popularity = self._popularity
        popularity.update(e["item_id"] for e in events if isinstance(e.get("item_id"), str))
        if keep is not None and len(popularity) > 2 * max(keep, 1000):  # the most popular
            self._popularity = collections.Counter(dict(popularity.most_common(max(keep, 1000))))
        record.n_events = len(events)
        return web.json_response({"accepted": len(events)}, status=202)

    async def _recommend(self, request: web.Request) -> web.Response:
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        refused = self._front(request)
        # not `or`: a Response is a mapping, and false when empty on older aiohttp
        if refused is None:
            refused = self._check_key(request)
        if refused is not None:
            return refused
        try:
            data = _JSON.decode(body)
        except _UNDECODABLE:
            return _error(400, "Malformed JSON")
        if not isinstance(data, dict) or not isinstance(data.get("user_id"), str):
            return _error(400, "Missing mandatory fields")
        limit = data.get("limit", 12)
        if not isinstance(limit, int) or not 1 <= limit <= 100:
            return _error(400, "Invalid limit")
        items = [item for item, _ in self._popularity.most_common(limit)]
        rec_id = "rec_" + uuid.uuid4().hex[:16]
        self.recommendations[rec_id] = items
        if self.keep is not None and len(self.recommendations) > self.keep:
            self.recommendations.popitem(last=False)
        return web.json_response(
            {"recommendation_id": rec_id, "user_id": data["user_id"], "all_item_ids": items}
        )


def _hold_port(address: Any) -> socket.socket:
    """A socket bound to ``address`` (a sockname), not listening: connection attempts to
    it are refused, and no one else can take the port meanwhile."""
    family = socket.AF_INET6 if len(address) == 4 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == "posix":  # as asyncio does: rebind despite TIME_WAIT connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _abort(request: web.BaseRequest) -> NoReturn:
    """Reset the request's connection and end its handler without an answer."""
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError  # aiohttp ends the handler quietly


class _Subscriber(NamedTuple):
    on_request: Callable[[RequestRecord, list[dict[str, Any]]], None]
    on_reset: Callable[[], None] | None


def _call(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # a subscriber never breaks the ingestion contract
        logger.exception("a ReferenceServer subscriber failed")


_TITLE = re.compile(rb"<title>(.*?)</title>", re.S | re.I)
#: The messages for which the server names no event but one may be found in the body.
_VALIDATION = frozenset({"Malformed JSON", "Missing mandatory fields", "Invalid event_family"})


def _describe(
    request: web.BaseRequest,
    record: RequestRecord,
    response: web.StreamResponse | None,
    stored: list[dict[str, Any]] | None,
    limit: int,
) -> None:
    """Fill in what `RequestRecord` says of the answer: its message, whether it was a
    duplicate, the batch size and, for a 400, the event refused where it can be found."""
    record.body_size = len(record.body) or (request.content_length or 0)
    if record.status == 0 or response is None:
        record.message = "no answer: the connection was dropped"
        if stored:
            record.message += " after its events were stored"
    elif isinstance(response, web.Response) and isinstance(response.body, bytes):
        record.message, record.duplicate = _answer_message(response.content_type, response.body)
    if stored is not None:
        record.batch_size = len(stored)
    if not record.refused or record.batch_size is not None or not record.body:
        return
    inflated = _inflate(request, record.body, limit)
    try:
        data = _JSON.decode(inflated) if isinstance(inflated, bytes) else None
    except _UNDECODABLE:
        data = None
    if data is None:
        return
    events = data if isinstance(data, list) else [data]
    record.batch_size = len(events)
    if record.refused_event is None and record.status == 400 and record.message in _VALIDATION:
        for event in events:
            if not isinstance(event, dict) or isinstance(_decode_events(_JSON_ENCODE(event)), str):
                record.refused_event = event
                break


_JSON_ENCODE = msgspec.json.encode


def _answer_message(content_type: str, body: bytes) -> tuple[str | None, bool]:
    """The message an answer carries, and whether it says the request was a duplicate."""
    if content_type == "application/json":
        try:
            data = _JSON.decode(body)
        except _UNDECODABLE:
            return None, False
        if isinstance(data, dict):
            error = data.get("error")
            return (error if isinstance(error, str) else None), data.get("duplicate") is True
        return None, False
    if content_type == "text/html":
        title = _TITLE.search(body)
        return (title[1].decode("utf-8", "replace").strip() if title else None), False
    return body[:200].decode("utf-8", "replace") or None, False


_MANDATORY = ("user_id", "event_family", "event_name")


def _decode_events(body: bytes) -> list[dict[str, Any]] | str:
    """The events of a body, or the message of the 400 it gets."""
    try:
        data = _JSON.decode(body)
    except _UNDECODABLE:
        return "Malformed JSON"
    events = data if isinstance(data, list) else [data]
    for event in events:
        if not isinstance(event, dict):
            return "Malformed JSON"
        for field in _MANDATORY:
            value = event.get(field)
            if not value or not isinstance(value, str):
                return "Missing mandatory fields"
        if event["event_family"] not in FAMILIES:
            return "Invalid event_family"
    return events


def _inflate(request: web.BaseRequest, body: bytes, limit: int) -> bytes | web.Response:
    """The body with its ``Content-Encoding`` undone, at most ``limit`` bytes; or the
    answer: ``413`` over the limit, ``400 Malformed JSON`` for a corrupt stream, ``415``
    for an encoding other than gzip or deflate."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    wbits = _ENCODINGS.get(encoding)
    if wbits is None:
        return _error(415, f"Unsupported Content-Encoding: {encoding[:40]}")
    parts: list[bytes] = []
    size = 0
    try:
        while True:  # one stream, or several gzip members one after the other
            inflater = zlib.decompressobj(wbits)
            data = body
            while True:
                part = inflater.decompress(data, limit - size + 1)
                size += len(part)
                if size > limit:
                    return _too_large(limit)
                parts.append(part)
                data = inflater.unconsumed_tail
                if not data:
                    break
            if not inflater.eof:
                return _error(400, "Malformed JSON")  # truncated
            body = inflater.unused_data
            if not body:
                break
            if wbits != _ENCODINGS["gzip"]:
                return _error(400, "Malformed JSON")  # bytes after the stream
    except zlib.error:
        return _error(400, "Malformed JSON")
    return b"".join(parts)


def _too_large(limit: int) -> web.Response:
    return _error(413, f"Payload Too Large: the limit is {limit} bytes")


def _error(status: int, message: str, plain_text: bool = False) -> web.Response:
    if plain_text:
        return web.Response(status=status, text=message)
    return web.json_response({"error": message}, status=status)


def assert_tracked(
    source: Tracker | Iterable[Event] | Iterable[dict[str, Any]],
    count: int | None = None,
    **fields: Any,
) -> list[Any]:
    """Assert that events with these field values were sent; return the matching ones.

    Args:
        source: A ``Tracker(capture=True)`` (flush it first: only sent batches count),
            a list of `Event`, or a list of event dicts (``ReferenceServer.events``).
        count: How many must match; None means at least one.
        **fields: Field values to match, e.g. ``event_name="purchase", user_id="u1"``;
            ``context`` matches a subset of the event's context.

    Raises:
        AssertionError: saying what was expected and what was sent.

    Usage::

        tracker = Tracker(capture=True)
        tracker.track("usr_1", "purchase", item_id="p1", context={"price": 9.5})
        await tracker.flush()
        assert_tracked(tracker, event_name="purchase", context={"price": 9.5}, count=1)
    """
    from ._tracker import Tracker

    events: list[Any] = source.captured if isinstance(source, Tracker) else list(source)

    def field(event: Any, name: str) -> Any:
        return event.get(name) if isinstance(event, dict) else getattr(event, name, None)

    def matches(event: Any) -> bool:
        for name, expected in fields.items():
            actual = field(event, name)
            if name == "context" and isinstance(expected, dict):
                if not isinstance(actual, dict) or any(
                    actual.get(k, _MISSING) != v for k, v in expected.items()
                ):
                    return False
            elif actual != expected:
                return False
        return True

    found = [event for event in events if matches(event)]
    if (count is None and not found) or (count is not None and len(found) != count):
        wanted = "at least one" if count is None else str(count)
        shown = "\n  ".join(repr(e) for e in events[:20]) or "(none)"
        more = f"\n  ... and {len(events) - 20} more" if len(events) > 20 else ""
        raise AssertionError(
            f"expected {wanted} event(s) with {fields}, found {len(found)} among "
            f"{len(events)} sent:\n  {shown}{more}"
        )
    return found


_MISSING = object()
