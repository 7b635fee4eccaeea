"""What a `ReferenceServer` records of each request (`RequestRecord`), and how it
describes the answer it gave."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

from ._contract import _JSON, _UNDECODABLE, _decode_events, _inflate

logger = logging.getLogger("lehnz_async.testing")


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
