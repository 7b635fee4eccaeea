"""`ReferenceServer`: the ingestion contract (`._contract`) served on loopback, with
its faults (`._faults`), outages (`._outages`) and inspector."""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from aiohttp import web

from .._inspector import Inspector, host_name
from ._contract import (
    _JSON,
    _UNDECODABLE,
    DEFAULT_BACKLOG,
    DEFAULT_TEST_KEY,
    INGEST_PATH,
    RECOMMEND_PATH,
    _decode_events,
    _error,
    _inflate,
    check_key,
)
from ._faults import FaultPlan, Outage
from ._outages import Outages
from ._records import RequestRecord, _call, _describe, _Subscriber
from ._wire import Wire

logger = logging.getLogger("lehnz_async.testing")


class ReferenceServer(Wire, Outages):
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
        return check_key(request.headers, self.api_keys, self.revoked)

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
