"""The event inspector of the reference server: a live page at ``/`` and a JSON query API.

`ReferenceServer` (so ``lehnz-async serve``) serves, beside the ingestion contract:

- ``GET /``: the page (``lehnz_async/inspector/``: plain HTML, JS and CSS, no build step,
  nothing fetched from elsewhere). A live table of accepted events (new rows arrive over
  server-sent events), filters by ``user_id``, ``event_name`` and ``event_family``, each
  event's JSON and the request it came in, a tab of refused requests, and counters.
- ``GET /inspector/stream``: the server-sent events behind the page. One ``request``
  message per ingest request once it is answered (``{"request": ..., "events": [...],
  "counters": ...}``), and ``reset`` when the server is cleared. A browser that reads too
  slowly (more than `MAX_CLIENT_BYTES` waiting for it) has its stream closed; it
  reconnects and reloads from the API, so a slow reader never grows the server's memory.
- ``GET /inspector/api/events?user_id=&event_name=&event_family=&after=&limit=``: the
  events held, oldest first, each with its id and its request; exact matches, empty
  parameters ignored; ``after=ID`` only those after that id, ``limit=N`` the last N.
- ``GET /inspector/api/refused?after=&limit=``: the refused requests held, oldest first.
- ``GET /inspector/api/counters``: what the counters on the page show.
- ``POST /inspector/api/reset``: forget what the server holds (events, requests, the
  ``Idempotency-Key``s seen, recommendations and popularity) and zero the counters. Its
  `FaultPlan`, revoked keys and outages stay as they are.

What the inspector holds is bounded like the server: with ``keep=N`` the last N events and
the last N refused requests (``lehnz-async serve`` keeps 10,000). Request headers are shown
with ``X-API-KEY`` (and ``Authorization``, ``Proxy-Authorization``, ``Cookie``) masked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.resources
import logging
import re
import time
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

if TYPE_CHECKING:
    from .testing import ReferenceServer, RequestRecord

logger = logging.getLogger("lehnz_async.testing")

STREAM_PATH = "/inspector/stream"
API_PATH = "/inspector/api"
#: Bytes of messages that may wait for one browser; past that its stream is closed (it
#: reconnects and reloads what it shows from the API).
MAX_CLIENT_BYTES = 4 * 1024 * 1024
#: Browsers (streams) served at once; more get 503.
MAX_CLIENTS = 64
#: Seconds between two keep-alive comments on an idle stream (which also find out that a
#: browser went away).
HEARTBEAT = 15.0
#: Headers whose value is never shown.
SECRET_HEADERS = frozenset({"x-api-key", "authorization", "proxy-authorization", "cookie"})
_KEY_PREFIX = re.compile(r"lehnz_[a-z]{2}_")
_TITLE = re.compile(rb"<title>(.*?)</title>", re.S | re.I)
#: The messages for which the server names no event but one may be found in the body.
_VALIDATION = frozenset({"Malformed JSON", "Missing mandatory fields", "Invalid event_family"})
_FILTERS = ("user_id", "event_name", "event_family")
_STATIC = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class InspectedRequest(msgspec.Struct, kw_only=True):
    """One ingest request, as the inspector shows it (and its API returns it)."""

    #: Numbered from 1, in the order the requests were answered; never reused.
    id: int
    #: When it arrived, in seconds since the epoch.
    time: float
    #: The answer's status; 0 when there was none (connection dropped or cut).
    status: int
    #: ``"accepted"``, ``"duplicate"`` (202 again for a known ``Idempotency-Key``) or
    #: ``"refused"`` (any other answer, or none).
    outcome: str
    #: The answer's message (``error`` of its JSON, a proxy page's title), if any.
    message: str | None
    #: Events in the body, when it could be read and decoded.
    batch_size: int | None
    #: Bytes of the body as sent (0 when it was refused before it was read).
    body_bytes: int
    idempotency_key: str | None
    #: The request's headers, secrets masked.
    headers: dict[str, str]
    remote: str | None
    #: Milliseconds from its arrival to its answer.
    duration_ms: float
    #: For a ``400``: the event that was refused, where known (a `FaultPlan.reject_event`
    #: verdict, or the first event that fails validation).
    event: Any = None


class _Batch:
    """The events one request brought, with the id of the first one."""

    __slots__ = ("events", "first_id", "request")

    def __init__(self, first_id: int, events: list[dict[str, Any]], request: InspectedRequest):
        self.first_id = first_id
        self.events = events
        self.request = request


class _Client:
    """One browser's stream: the messages waiting for it, bounded in bytes."""

    __slots__ = ("closed", "frames", "overflowed", "size", "transport", "wake")

    def __init__(self, transport: asyncio.Transport | None) -> None:
        self.transport = transport
        self.frames: list[bytes] = []
        self.size = 0
        self.closed = False
        self.overflowed = False
        self.wake = asyncio.Event()

    def push(self, frame: bytes) -> None:
        if self.closed:
            return
        if self.size + len(frame) > MAX_CLIENT_BYTES:  # cut it off: a write may be stuck
            self.overflowed = True
            self.close()
            if self.transport is not None:
                self.transport.abort()
            return
        self.frames.append(frame)
        self.size += len(frame)
        self.wake.set()

    def take(self) -> bytes:
        data = b"".join(self.frames)
        self.frames = []
        self.size = 0
        return data

    def close(self) -> None:
        self.closed = True
        self.frames = []
        self.size = 0
        self.wake.set()


_encode = msgspec.json.encode
_decode = msgspec.json.Decoder().decode


class Inspector:
    """What a `ReferenceServer` shows at ``/``; the server calls it as requests are answered.

    Args:
        server: The server it belongs to (its ``keep`` bounds what is held).
    """

    def __init__(self, server: ReferenceServer) -> None:
        self._server = server
        self._batches: collections.deque[_Batch] = collections.deque()
        self._held = 0  # events in _batches
        self._refused: collections.deque[InspectedRequest] = collections.deque()
        self._next_event = 1
        self._next_request = 1
        self._counters = {"events": 0, "requests": 0, "refused": 0, "duplicates": 0}
        self._resets = 0
        # per request in progress (by id() of its RequestRecord): its stored events, and
        # the event a reject_event verdict named
        self._pending_events: dict[int, list[dict[str, Any]]] = {}
        self._pending_refused: dict[int, Any] = {}
        self._clients: set[_Client] = set()
        self._static: dict[str, bytes] = {}

    # -- wiring ---------------------------------------------------------------------------

    def install(self, app: web.Application) -> None:
        """Add the page, the stream and the API to the server's app."""
        app.router.add_get("/", self._page)
        for name in _STATIC:
            app.router.add_get(f"/inspector/{name}", self._page)
        app.router.add_get(STREAM_PATH, self._stream)
        app.router.add_get(f"{API_PATH}/events", self._api_events)
        app.router.add_get(f"{API_PATH}/refused", self._api_refused)
        app.router.add_get(f"{API_PATH}/counters", self._api_counters)
        app.router.add_post(f"{API_PATH}/reset", self._api_reset)
        app.on_shutdown.append(self._close_streams)

    @property
    def url(self) -> str:
        """The page's address (a wildcard host shown as loopback)."""
        server = self._server
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(server.host)
        if host is None:
            host = f"[{server.host}]" if ":" in server.host else server.host
        scheme = "http" if server.ssl_context is None else "https"
        return f"{scheme}://{host}:{server.port}/"

    # -- record-keeping (called by the server) --------------------------------------------

    def note_events(self, record: RequestRecord, events: list[dict[str, Any]]) -> None:
        """``record``'s events were stored."""
        self._pending_events[id(record)] = events

    def note_refused(self, record: RequestRecord, event: Any) -> None:
        """``record`` is refused because of ``event``."""
        self._pending_refused[id(record)] = event

    def record(
        self, request: web.BaseRequest, record: RequestRecord, response: web.StreamResponse | None
    ) -> None:
        """``record`` is answered (or dropped, ``response`` None); its body is still there."""
        try:
            self._record(request, record, response)
        except Exception as exc:  # never let the inspector break the ingestion contract
            logger.error("inspector: could not record request: %r", exc)

    def _record(
        self, request: web.BaseRequest, record: RequestRecord, response: web.StreamResponse | None
    ) -> None:
        key = id(record)
        events = self._pending_events.pop(key, None)
        offending = self._pending_refused.pop(key, _UNKNOWN)
        status = record.status
        message, duplicate = _answer(response) if status else (None, False)
        if status == 0:
            message = "no answer: the connection was dropped"
            if events:
                message += " after its events were stored"
        refused = not 200 <= status < 300
        batch_size: int | None = len(events) if events is not None else None
        if refused and batch_size is None and record.body:
            batch_size, found = _inspect_body(request, record.body, self._server)
            if offending is _UNKNOWN and status == 400 and message in _VALIDATION:
                offending = found
        now = time.monotonic()
        info = InspectedRequest(
            id=self._next_request,
            time=time.time() - (now - record.received_at),
            status=status,
            outcome="refused" if refused else "duplicate" if duplicate else "accepted",
            message=message,
            batch_size=batch_size,
            body_bytes=len(record.body) or (request.content_length or 0),
            idempotency_key=record.idempotency_key,
            headers=mask_headers(record.headers),
            remote=request.remote,
            duration_ms=round(((record.answered_at or now) - record.received_at) * 1000, 3),
            event=None if offending is _UNKNOWN else offending,
        )
        self._next_request += 1
        counters = self._counters
        counters["requests"] += 1
        keep = self._server.keep
        first_id = self._next_event
        if events:
            self._add_batch(_Batch(first_id, events, info), keep)
            counters["events"] += len(events)
        if refused:
            counters["refused"] += 1
            self._refused.append(info)
            if keep is not None and len(self._refused) > keep:
                self._refused.popleft()
        elif duplicate:
            counters["duplicates"] += 1
        if self._clients:
            items = [{"id": first_id + i, "event": e} for i, e in enumerate(events or ())]
            message_ = {"request": info, "events": items, "counters": self.counters()}
            self._broadcast(b"request", _encode(message_))

    def _add_batch(self, batch: _Batch, keep: int | None) -> None:
        batches = self._batches
        batches.append(batch)
        self._next_event += len(batch.events)
        self._held += len(batch.events)
        if keep is None or self._held <= keep:
            return
        while self._held - len(batches[0].events) >= keep:
            self._held -= len(batches.popleft().events)
        if self._held > keep:  # the oldest batch only in part
            first = batches[0]
            cut = self._held - keep
            first.events = first.events[cut:]
            first.first_id += cut
            self._held = keep

    def counters(self) -> dict[str, int]:
        """Events accepted, requests, refused requests and duplicates since the last reset;
        the events held now; the id of the last request recorded, and how many resets
        there were (together they order two readings of the counters)."""
        return {
            **self._counters,
            "held": self._held,
            "last_request": self._next_request - 1,
            "resets": self._resets,
        }

    def reset(self) -> None:
        """Forget what the server holds and zero the counters (ids keep counting)."""
        server = self._server
        server.events.clear()
        server.requests.clear()
        server.duplicates = 0
        server.recommendations.clear()
        server._accepted_keys.clear()
        server._popularity.clear()
        self._batches.clear()
        self._held = 0
        self._refused.clear()
        self._counters = dict.fromkeys(self._counters, 0)
        self._resets += 1
        logger.info("inspector: reset; the server holds nothing")
        self._broadcast(b"reset", _encode({"counters": self.counters()}))
        server._notify()

    # -- queries --------------------------------------------------------------------------

    def events(
        self,
        *,
        after: int = 0,
        limit: int | None = None,
        **filters: str,
    ) -> list[tuple[int, dict[str, Any], InspectedRequest]]:
        """The events held (id, event, request), oldest first; ``filters`` match exactly."""
        wanted = [(name, value) for name, value in filters.items() if value]
        found: list[tuple[int, dict[str, Any], InspectedRequest]] = []
        for batch in reversed(self._batches):  # newest first, to stop at the limit
            if batch.first_id + len(batch.events) - 1 <= after:
                break
            for i in range(len(batch.events) - 1, -1, -1):
                id_ = batch.first_id + i
                if id_ <= after:
                    break
                event = batch.events[i]
                if all(event.get(name) == value for name, value in wanted):
                    found.append((id_, event, batch.request))
                    if limit is not None and len(found) >= limit:
                        break
            if limit is not None and len(found) >= limit:
                break
        found.reverse()
        return found

    def refused(self, *, after: int = 0, limit: int | None = None) -> list[InspectedRequest]:
        """The refused requests held, oldest first."""
        found = [r for r in self._refused if r.id > after]
        return found[-limit:] if limit is not None else found

    # -- HTTP -----------------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.Response:
        name = request.path.rpartition("/")[2] or "index.html"
        body = self._static.get(name)
        if body is None:
            resource = importlib.resources.files(__package__ or "lehnz_async") / "inspector"
            body = self._static[name] = (resource / name).read_bytes()
        response = web.Response(body=body, content_type=_STATIC[name], charset="utf-8")
        response.headers.update(_SECURITY_HEADERS)
        return response

    async def _api_events(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            after, limit = _paging(query)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        filters = {name: query.get(name, "") for name in _FILTERS}
        found = self.events(after=after, limit=limit, **filters)
        items = [{"id": id_, "event": event, "request": req} for id_, event, req in found]
        return _json(
            {
                "count": len(items),
                "events": items,
                "last_id": self._next_event - 1,
                "keep": self._server.keep,
                "counters": self.counters(),
            }
        )

    async def _api_refused(self, request: web.Request) -> web.Response:
        try:
            after, limit = _paging(request.query)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        found = self.refused(after=after, limit=limit)
        return _json(
            {
                "count": len(found),
                "refused": found,
                "last_id": self._next_request - 1,
                "keep": self._server.keep,
                "counters": self.counters(),
            }
        )

    async def _api_counters(self, request: web.Request) -> web.Response:
        return _json(self.counters())

    async def _api_reset(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin is not None and origin.partition("://")[2] != request.host:
            return _json({"error": "cross-origin reset refused"}, 403)  # another page's
        self.reset()
        return _json({"reset": True, "counters": self.counters()})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if len(self._clients) >= MAX_CLIENTS:
            return _json({"error": f"at most {MAX_CLIENTS} inspector streams at once"}, 503)
        client = _Client(request.transport)
        self._clients.add(client)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        logger.debug("inspector: stream opened for %s", request.remote)
        self._server._notify()
        try:
            await response.prepare(request)
            await response.write(b"retry: 1000\n: live\n\n")
            while True:
                if not client.frames and not client.closed:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(client.wake.wait(), HEARTBEAT)
                client.wake.clear()
                if client.closed:
                    break
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                await response.write(client.take() or b": ping\n\n")
        except ConnectionError:  # the browser went away mid-write
            pass
        finally:
            self._clients.discard(client)
            client.close()
            self._server._notify()
        if client.overflowed:
            logger.warning(
                "inspector: the stream to %s fell %d bytes behind and was closed (it reconnects)",
                request.remote,
                MAX_CLIENT_BYTES,
            )
        else:
            logger.debug("inspector: stream closed for %s", request.remote)
        return response

    def _broadcast(self, kind: bytes, data: bytes) -> None:
        if not self._clients:
            return
        frame = b"event: " + kind + b"\ndata: " + data + b"\n\n"
        for client in list(self._clients):
            client.push(frame)
            if client.closed:  # it fell too far behind: it no longer counts
                self._clients.discard(client)

    async def _close_streams(self, app: web.Application) -> None:
        for client in self._clients:
            client.close()

    @property
    def streams(self) -> int:
        """Browsers (streams) connected now."""
        return len(self._clients)


_UNKNOWN: Any = object()


def mask_headers(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` with the values of `SECRET_HEADERS` masked: a Lehnz key keeps its kind
    (``lehnz_pk_****``), anything else becomes ``****``."""
    masked = {}
    for name, value in headers.items():
        if name.lower() in SECRET_HEADERS:
            prefix = _KEY_PREFIX.match(value)
            value = (prefix[0] if prefix else "") + "****"
        masked[name] = value
    return masked


def _answer(response: web.StreamResponse | None) -> tuple[str | None, bool]:
    """The message an answer carries, and whether it says the request was a duplicate."""
    if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        return None, False
    body = response.body
    if response.content_type == "application/json":
        try:
            data = _decode(body)
        except (ValueError, RecursionError):
            return None, False
        if isinstance(data, dict):
            error = data.get("error")
            return (error if isinstance(error, str) else None), data.get("duplicate") is True
        return None, False
    if response.content_type == "text/html":
        title = _TITLE.search(body)
        return (title[1].decode("utf-8", "replace").strip() if title else None), False
    return body[:200].decode("utf-8", "replace") or None, False


def _inspect_body(
    request: web.BaseRequest, body: bytes, server: ReferenceServer
) -> tuple[int | None, Any]:
    """A refused body's batch size and its first event that fails validation (or
    `_UNKNOWN`), where the body can be decoded."""
    from . import testing

    inflated = testing._inflate(request, body, server.faults.max_body_size)
    if isinstance(inflated, web.Response):
        return None, _UNKNOWN
    try:
        data = _decode(inflated)
    except (ValueError, RecursionError):
        return None, _UNKNOWN
    events = data if isinstance(data, list) else [data]
    for event in events:
        if not isinstance(event, dict) or isinstance(testing._decode_events(_encode(event)), str):
            return len(events), event
    return len(events), _UNKNOWN


_DIGITS = re.compile(r"[0-9]{1,18}")


def _paging(query: Any) -> tuple[int, int | None]:
    after_text, limit_text = query.get("after", ""), query.get("limit", "")
    if after_text and not _DIGITS.fullmatch(after_text):
        raise ValueError("after must be an event or request id (an integer >= 0)")
    if limit_text and (not _DIGITS.fullmatch(limit_text) or int(limit_text) < 1):
        raise ValueError("limit must be a positive integer")
    return int(after_text or 0), int(limit_text) if limit_text else None


def _json(data: Any, status: int = 200) -> web.Response:
    response = web.Response(body=_encode(data), status=status, content_type="application/json")
    response.headers["Cache-Control"] = "no-cache"
    return response
