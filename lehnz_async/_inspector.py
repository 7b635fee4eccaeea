"""The event inspector of the reference server: a live page at ``/`` and a JSON query API.

`ReferenceServer` (so ``lehnz-async serve``) serves, beside the ingestion contract:

- ``GET /``: the page (``lehnz_async/inspector/``: plain HTML, JS and CSS, no build step,
  nothing fetched from elsewhere). A live table of accepted events (new rows arrive over
  server-sent events) with filters, a search, "load older", pause and export; a per-user
  timeline across identify events; each event's JSON and the request it came in; a tab
  of refused requests; counters.
- ``GET /inspector/stream``: the server-sent events behind the page. One ``request``
  message per ingest request once it is answered (``{"request": ..., "events": [...],
  "counters": ...}``), and ``reset`` when the server is cleared. A browser that reads too
  slowly (more than `MAX_CLIENT_BYTES` waiting for it) has its stream closed; it
  reconnects and reloads from the API, so a slow reader never grows the server's memory.
- ``GET /inspector/api/events?user_id=&event_name=&event_family=&item_id=&session_id=
  &recommendation_id=&q=&after=&before=&limit=``: the events held, oldest first, each with
  its id and its request; exact matches, empty parameters ignored, ``q`` a
  case-insensitive search of the event's values; ``after``/``before`` bound the ids,
  ``limit=N`` keeps the last N, and ``more`` says whether older ones matched beyond it.
- ``GET /inspector/api/timeline?user_id=``: one person's events, the ids joined by the
  identify events held (anonymous and signed in), oldest first; ``before``/``limit`` too.
- ``GET /inspector/api/export?format=csv|json&...``: the events the same parameters (or
  ``timeline=USER``) select, as a download: CSV, or a JSON array of the events as sent.
- ``GET /inspector/api/refused?after=&before=&limit=``: the refused requests held.
- ``GET /inspector/api/counters``: what the counters on the page show.
- ``POST /inspector/api/reset``: `ReferenceServer.reset`, and zero the counters.

Each of these answers 403 unless the request's ``Host`` is a loopback name (``localhost``,
``127.0.0.1``, ``[::1]``), the server's own host, or one in ``ReferenceServer.allow_hosts``:
a page on another site that reaches the port through DNS rebinding sends its own name.
The ingestion and recommend endpoints do not check it.

What the inspector holds is bounded like the server: with ``keep=N`` the last N events and
the last N refused requests (``lehnz-async serve`` keeps 10,000). Request headers are shown
with ``X-API-KEY``, ``Authorization``, ``Proxy-Authorization`` and ``Cookie`` masked, and
anything shaped like a Lehnz key masked in every other header.

It reads the server only through its public API (`ReferenceServer.subscribe`, ``reset``,
``keep``, ``allow_hosts``...): this module imports nothing from ``lehnz_async.testing``.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import msgspec
from aiohttp import web

from ._inspector_store import FILTERS, InspectedRequest, Query, Store, mask, mask_headers, to_csv
from ._inspector_stream import MAX_CLIENT_BYTES, Streams

__all__ = ["MAX_CLIENT_BYTES", "InspectedRequest", "Inspector", "host_name", "mask_headers"]

logger = logging.getLogger("lehnz_async.testing")

STREAM_PATH = "/inspector/stream"
API_PATH = "/inspector/api"
#: The names the inspector always answers to.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
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
_EXPORTS = {
    "csv": ("text/csv", "lehnz-events.csv"),
    "json": ("application/json", "lehnz-events.json"),
}
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Record(Protocol):
    """What the inspector reads of a `lehnz_async.testing.RequestRecord`."""

    received_at: float
    answered_at: float
    status: int
    headers: dict[str, str]
    remote: str | None
    body_size: int
    message: str | None
    duplicate: bool
    batch_size: int | None
    refused_event: Any

    @property
    def idempotency_key(self) -> str | None: ...

    @property
    def refused(self) -> bool: ...


class _Server(Protocol):
    """What the inspector uses of a `lehnz_async.testing.ReferenceServer`."""

    host: str
    port: int
    keep: int | None
    allow_hosts: frozenset[str]

    @property
    def ssl_context(self) -> Any: ...

    def subscribe(
        self,
        on_request: Callable[[Any, list[dict[str, Any]]], None],
        on_reset: Callable[[], None] | None = None,
    ) -> Callable[[], None]: ...

    def reset(self) -> None: ...

    def notify(self) -> None: ...


def host_name(name: str) -> str:
    """A host name as the inspector compares it: lower case, an IPv6 address bracketed.

    Raises:
        ValueError: ``name`` is empty, or holds a port, a path or a user.
    """
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if not name or any(c in name for c in "/ @?#[]"):
        raise ValueError(f"not a host name: {name!r}")
    return f"[{name}]" if ":" in name else name


def _host_of(header: str) -> str:
    """The name in a ``Host`` header (``name``, ``name:port``, ``[v6]:port``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else ""
    return header.rpartition(":")[0] if ":" in header else header


_encode = msgspec.json.encode


class Inspector:
    """What a `ReferenceServer` shows at ``/``; it subscribes to the server's requests.

    Args:
        server: The server it belongs to (its ``keep`` bounds what is held).
    """

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._store = Store()
        self._next_request = 1
        self._counters = {"events": 0, "requests": 0, "refused": 0, "duplicates": 0}
        self._resets = 0
        self._streams = Streams(server.notify)
        self._static: dict[str, bytes] = {}
        server.subscribe(self.record, self._on_reset)

    # -- wiring ---------------------------------------------------------------------------

    def install(self, app: web.Application) -> None:
        """Add the page, the stream and the API to the server's app, behind the Host check."""
        add_get = app.router.add_get
        add_get("/", self._guard(self._page))
        for name in _STATIC:
            add_get(f"/inspector/{name}", self._guard(self._page))
        add_get(STREAM_PATH, self._guard(self._streams.serve))
        add_get(f"{API_PATH}/events", self._guard(self._api_events))
        add_get(f"{API_PATH}/timeline", self._guard(self._api_timeline))
        add_get(f"{API_PATH}/export", self._guard(self._api_export))
        add_get(f"{API_PATH}/refused", self._guard(self._api_refused))
        add_get(f"{API_PATH}/counters", self._guard(self._api_counters))
        app.router.add_post(f"{API_PATH}/reset", self._guard(self._api_reset))
        app.on_shutdown.append(self._streams.close)

    @property
    def url(self) -> str:
        """The page's address (a wildcard host shown as loopback)."""
        server = self._server
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(server.host)
        if host is None:
            host = f"[{server.host}]" if ":" in server.host else server.host
        scheme = "http" if server.ssl_context is None else "https"
        return f"{scheme}://{host}:{server.port}/"

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """The ``Host`` names the page and its API answer to."""
        server = self._server
        own = {host_name(server.host)} if server.host else set()
        return LOOPBACK_NAMES | own | server.allow_hosts

    def _guard(self, handler: _Handler) -> _Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            host = request.headers.get("Host", "")
            if _host_of(host) not in self.allowed_hosts:
                logger.warning("inspector: refused a request for Host %r", host[:100])
                return _json(
                    {
                        "error": f"Host {host[:100]!r} is not allowed. The inspector answers "
                        "only to localhost, 127.0.0.1, [::1], the server's own host and the "
                        "names added with ReferenceServer(allow_hosts=...) or `lehnz-async "
                        "serve --allow-host NAME` (a defence against DNS rebinding)."
                    },
                    403,
                )
            return await handler(request)

        return guarded

    # -- record-keeping (the server's subscription) ---------------------------------------

    def record(self, record: _Record, events: list[dict[str, Any]]) -> None:
        """``record`` is answered (or dropped); ``events`` are what it stored."""
        now = time.monotonic()
        refused = record.refused
        key = record.idempotency_key
        info = InspectedRequest(
            id=self._next_request,
            time=time.time() - (now - record.received_at),
            status=record.status,
            outcome="refused" if refused else "duplicate" if record.duplicate else "accepted",
            message=record.message,
            batch_size=record.batch_size,
            body_bytes=record.body_size,
            idempotency_key=None if key is None else mask(key),
            headers=mask_headers(record.headers),
            remote=record.remote,
            duration_ms=round(((record.answered_at or now) - record.received_at) * 1000, 3),
            event=record.refused_event,
        )
        self._next_request += 1
        counters = self._counters
        counters["requests"] += 1
        keep = self._server.keep
        first_id = self._store.add(events, info, keep)
        counters["events"] += len(events)
        if refused:
            counters["refused"] += 1
            self._store.add_refused(info, keep)
        elif record.duplicate:
            counters["duplicates"] += 1
        if len(self._streams):
            items = [{"id": first_id + i, "event": e} for i, e in enumerate(events)]
            message = {"request": info, "events": items, "counters": self.counters()}
            self._streams.broadcast(b"request", _encode(message))

    def _on_reset(self) -> None:
        self._store.clear()
        self._counters = dict.fromkeys(self._counters, 0)
        self._resets += 1
        self._streams.broadcast(b"reset", _encode({"counters": self.counters()}))

    def counters(self) -> dict[str, int]:
        """Events accepted, requests, refused requests and duplicates since the last reset;
        the events held now; the id of the last request recorded, and how many resets
        there were (together they order two readings of the counters)."""
        return {
            **self._counters,
            "held": self._store.held,
            "last_request": self._next_request - 1,
            "resets": self._resets,
        }

    def reset(self) -> None:
        """`ReferenceServer.reset`: forget what the server holds, and zero the counters
        (ids keep counting)."""
        self._server.reset()

    @property
    def streams(self) -> int:
        """Browsers (streams) connected now."""
        return len(self._streams)

    # -- queries --------------------------------------------------------------------------

    def events(
        self, *, after: int = 0, limit: int | None = None, search: str = "", **filters: str
    ) -> list[tuple[int, dict[str, Any], InspectedRequest]]:
        """The events held (id, event, request), oldest first; ``filters`` match exactly."""
        return self._store.select(Query(filters, search), after=after, limit=limit)[0]

    def refused(self, *, after: int = 0, limit: int | None = None) -> list[InspectedRequest]:
        """The refused requests held, oldest first."""
        return self._store.refused(after=after, limit=limit)[0]

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

    def _listing(self, items: list[Any], more: bool, name: str, last_id: int) -> dict[str, Any]:
        return {
            "count": len(items),
            name: items,
            "more": more,
            "last_id": last_id,
            "keep": self._server.keep,
            "counters": self.counters(),
        }

    async def _api_events(self, request: web.Request) -> web.Response:
        try:
            after, before, limit = _paging(request.query)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        found, more = self._store.select(
            _query(request.query), after=after, before=before, limit=limit
        )
        items = [{"id": id_, "event": event, "request": req} for id_, event, req in found]
        return _json(self._listing(items, more, "events", self._store.next_event - 1))

    async def _api_timeline(self, request: web.Request) -> web.Response:
        user = request.query.get("user_id", "")
        try:
            after, before, limit = _paging(request.query)
            if not user:
                raise ValueError("user_id is required")
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        ids, links = self._store.identity(user)
        query = Query(users=frozenset(ids))
        found, more = self._store.select(query, after=after, before=before, limit=limit)
        items = [{"id": id_, "event": event, "request": req} for id_, event, req in found]
        anonymous = sorted({link["previous_user_id"] for link in links})
        listing = self._listing(items, more, "events", self._store.next_event - 1)
        return _json(
            {"user_id": user, "ids": ids, "anonymous": anonymous, "links": links, **listing}
        )

    async def _api_export(self, request: web.Request) -> web.Response:
        query = request.query
        kind = _EXPORTS.get(query.get("format", "json"))
        try:
            after, before, limit = _paging(query)
            if kind is None:
                raise ValueError("format must be csv or json")
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        user = query.get("timeline", "")
        selection = Query(users=frozenset(self._store.identity(user)[0])) if user else None
        found, _ = self._store.select(
            selection or _query(query), after=after, before=before, limit=limit
        )
        content_type, filename = kind
        if content_type == "text/csv":
            body = to_csv(found).encode()
        else:
            body = _encode([event for _, event, _ in found])
        response = web.Response(body=body, content_type=content_type, charset="utf-8")
        response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    async def _api_refused(self, request: web.Request) -> web.Response:
        try:
            after, before, limit = _paging(request.query)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        found, more = self._store.refused(after=after, before=before, limit=limit)
        return _json(self._listing(found, more, "refused", self._next_request - 1))

    async def _api_counters(self, request: web.Request) -> web.Response:
        return _json(self.counters())

    async def _api_reset(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin is not None and origin.partition("://")[2] != request.host:
            return _json({"error": "cross-origin reset refused"}, 403)  # another page's
        self.reset()
        return _json({"reset": True, "counters": self.counters()})


_DIGITS = re.compile(r"[0-9]{1,18}")


def _paging(query: Mapping[str, str]) -> tuple[int, int | None, int | None]:
    """``after``, ``before`` and ``limit`` from a query (ValueError names the bad one)."""
    values: list[int | None] = []
    for name in ("after", "before", "limit"):
        text = query.get(name, "")
        if text and (not _DIGITS.fullmatch(text) or (name == "limit" and int(text) < 1)):
            what = "a positive integer" if name == "limit" else "an id (an integer >= 0)"
            raise ValueError(f"{name} must be {what}")
        values.append(int(text) if text else None)
    after, before, limit = values
    return after or 0, before, limit


def _query(query: Mapping[str, str]) -> Query:
    return Query({name: query.get(name, "") for name in FILTERS}, query.get("q", "").strip())


def _json(data: Any, status: int = 200) -> web.Response:
    response = web.Response(body=_encode(data), status=status, content_type="application/json")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
