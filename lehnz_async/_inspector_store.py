"""What the event inspector holds, and how it is queried and exported.

`Store` keeps the events a `ReferenceServer` accepted, numbered from 1 in arrival order,
each with the request it came in, and the requests it refused; both bounded like the
server (``keep``). `Query` selects among them: exact matches on the event's fields, a
free-text search, or a user's identity (the ids joined by identify events). Nothing here
knows about HTTP; ``lehnz_async._inspector`` serves it.
"""

from __future__ import annotations

import collections
import csv
import datetime
import io
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import msgspec

#: The event fields the inspector filters on (exact matches).
FILTERS = (
    "user_id",
    "event_name",
    "event_family",
    "item_id",
    "recommendation_id",
    "session_id",
)
#: Headers whose value is never shown, whatever it looks like.
SECRET_HEADERS = frozenset({"x-api-key", "authorization", "proxy-authorization", "cookie"})
#: Anything shaped like a Lehnz key, in any header: it keeps its kind (``lehnz_sk_****``).
_KEY = re.compile(r"\b(lehnz_[a-z]{2}_)[^\s,;\"']*", re.I)
_CSV_COLUMNS = (
    "id", "time", "request", "user_id", "event_family", "event_name", "item_id",
    "session_id", "recommendation_id", "previous_user_id", "context",
)  # fmt: skip


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
    #: For a ``400``: the event that was refused, where known.
    event: Any = None


class _Batch:
    """The events one request brought, with the id of the first one."""

    __slots__ = ("events", "first_id", "request")

    def __init__(self, first_id: int, events: list[dict[str, Any]], request: InspectedRequest):
        self.first_id = first_id
        self.events = events
        self.request = request


Found = tuple[int, dict[str, Any], InspectedRequest]


class Query(NamedTuple):
    """Which events: every field given must match exactly, ``search`` must occur in one of
    the event's values (any depth, case-insensitive), and with ``users`` the event must
    be about one of them (its ``user_id`` or ``previous_user_id``)."""

    fields: Mapping[str, str] = {}
    search: str = ""
    users: frozenset[str] | None = None

    def matcher(self) -> Callable[[dict[str, Any]], bool]:
        wanted = [(name, value) for name, value in self.fields.items() if value]
        needle = self.search.lower()
        users = self.users

        def matches(event: dict[str, Any]) -> bool:
            if users is not None and not (
                event.get("user_id") in users or event.get("previous_user_id") in users
            ):
                return False
            if any(event.get(name) != value for name, value in wanted):
                return False
            return not needle or any(needle in text.lower() for text in _texts(event))

        return matches


#: Every event.
ALL = Query()


def _texts(event: dict[str, Any]) -> Iterator[str]:
    """The event's string and number values at any depth, and its context's keys."""
    stack: list[Any] = [event]
    top = True
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            if not top:
                yield from (key for key in value if isinstance(key, str))
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield str(value)
        top = False


class Store:
    """The events and refused requests held, bounded by the ``keep`` given on each add."""

    def __init__(self) -> None:
        self._batches: collections.deque[_Batch] = collections.deque()
        self.held = 0  # events in _batches
        self._refused: collections.deque[InspectedRequest] = collections.deque()
        #: The id the next event gets (ids are never reused, not even after a reset).
        self.next_event = 1

    def add(self, events: list[dict[str, Any]], request: InspectedRequest, keep: int | None) -> int:
        """Hold ``events`` (one request's); the id of the first one."""
        first_id = self.next_event
        if not events:
            return first_id
        batches = self._batches
        batches.append(_Batch(first_id, events, request))
        self.next_event += len(events)
        self.held += len(events)
        if keep is not None and self.held > keep:
            while self.held - len(batches[0].events) >= keep:
                self.held -= len(batches.popleft().events)
            if self.held > keep:  # the oldest batch only in part
                first = batches[0]
                cut = self.held - keep
                first.events = first.events[cut:]
                first.first_id += cut
                self.held = keep
        return first_id

    def add_refused(self, request: InspectedRequest, keep: int | None) -> None:
        self._refused.append(request)
        if keep is not None and len(self._refused) > keep:
            self._refused.popleft()

    def clear(self) -> None:
        self._batches.clear()
        self.held = 0
        self._refused.clear()

    def select(
        self,
        query: Query = ALL,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int | None = None,
    ) -> tuple[list[Found], bool]:
        """The matching events with ``after < id < before`` (the last ``limit`` of them),
        oldest first, and whether there are older ones that match beyond the limit."""
        matches = query.matcher()
        found: list[Found] = []
        more = False
        for batch in reversed(self._batches):  # newest first, to stop at the limit
            last = batch.first_id + len(batch.events) - 1
            if last <= after:
                break
            if before is not None and batch.first_id >= before:
                continue
            for i in range(len(batch.events) - 1, -1, -1):
                id_ = batch.first_id + i
                if id_ <= after:
                    break
                if before is not None and id_ >= before:
                    continue
                event = batch.events[i]
                if matches(event):
                    if limit is not None and len(found) >= limit:
                        more = True
                        break
                    found.append((id_, event, batch.request))
            if more:
                break
        found.reverse()
        return found, more

    def refused(
        self, *, after: int = 0, before: int | None = None, limit: int | None = None
    ) -> tuple[list[InspectedRequest], bool]:
        """The refused requests held with ``after < id < before``, oldest first (the last
        ``limit``), and whether older ones were left out."""
        found = [r for r in self._refused if r.id > after and (before is None or r.id < before)]
        if limit is not None and len(found) > limit:
            return found[-limit:], True
        return found, False

    def identity(self, user_id: str) -> tuple[list[str], list[dict[str, Any]]]:
        """The ids joined to ``user_id`` by the identify events held (an anonymous id and
        the account it signed in as, transitively), in order of first appearance; and
        those identify events' links ``{"id", "previous_user_id", "user_id"}``."""
        links: list[dict[str, Any]] = []
        joined: dict[str, set[str]] = collections.defaultdict(set)
        seen: dict[str, None] = {}
        for batch in self._batches:
            for i, event in enumerate(batch.events):
                user, previous = event.get("user_id"), event.get("previous_user_id")
                if isinstance(previous, str) and previous and isinstance(user, str):
                    links.append({"id": batch.first_id + i, "previous_user_id": previous,
                                  "user_id": user})  # fmt: skip
                    joined[user].add(previous)
                    joined[previous].add(user)
                    seen.setdefault(previous)
                if isinstance(user, str):
                    seen.setdefault(user)
        ids = {user_id}
        todo = [user_id]
        while todo:
            for other in joined.pop(todo.pop(), ()):
                if other not in ids:
                    ids.add(other)
                    todo.append(other)
        ordered = [id_ for id_ in seen if id_ in ids] or [user_id]
        return ordered, [link for link in links if link["user_id"] in ids]


def mask(value: str) -> str:
    """``value`` with anything shaped like a Lehnz key masked: ``lehnz_pk_****``."""
    return _KEY.sub(lambda m: m[1].lower() + "****", value)


def mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with the values of `SECRET_HEADERS` masked (a Lehnz key keeps its kind,
    ``lehnz_pk_****``, anything else becomes ``****``), and any key-shaped value in the
    others masked too."""
    masked = {}
    for name, value in headers.items():
        if name.lower() in SECRET_HEADERS:
            prefix = _KEY.search(value)
            value = (prefix[1].lower() if prefix else "") + "****"
        else:
            value = mask(value)
        masked[name] = value
    return masked


def to_csv(found: Iterable[Found]) -> str:
    """The events as CSV, one row each: their id, when their request arrived (UTC), the
    request's id, the event's fields, and its context as JSON. A cell a spreadsheet would
    take for a formula (``=``, ``+``, ``-``, ``@``) is prefixed with ``'``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(_CSV_COLUMNS)
    for id_, event, request in found:
        when = datetime.datetime.fromtimestamp(request.time, datetime.timezone.utc)
        row = [str(id_), when.isoformat(timespec="milliseconds"), str(request.id)]
        for name in _CSV_COLUMNS[3:]:
            value = event.get(name)
            cell = value if isinstance(value, str) or value is None else _json(value)
            row.append(_defuse(cell or ""))
        writer.writerow(row)
    return out.getvalue()


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _defuse(cell: str) -> str:
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell
