"""`lehnz-async send`'s lines: what a JSONL line may hold, why a bad one is bad, and how
an event is traced back to its line."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec

from .._event import Event
from .._exceptions import (
    InvalidEventError,
)
from .._tracker import Tracker

_FIELDS = frozenset((  # what a JSONL line may hold
    "user_id", "event_name", "event_family", "item_id", "session_id", "recommendation_id",
    "context", "previous_user_id",
))  # fmt: skip
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}  # fmt: skip
_decode = msgspec.json.Decoder().decode
_BOM = b"\xef\xbb\xbf"
WINDOW = 30_000  # lines tracked and not yet known to be settled, at most (memory bound)
CHUNK_LINES = 8_192  # lines between two barriers (flush() calls): the checkpoint's step
CHECKPOINT_SUFFIX = ".lehnz-checkpoint"
CHECKPOINT_EVERY = 0.5  # seconds between two checkpoint writes, at most one


class _Line(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A plain event line, decoded in one step (the fast path of `_send_line`)."""

    user_id: str
    event_name: str
    event_family: str | None = None
    item_id: str | None = None
    session_id: str | None = None
    recommendation_id: str | None = None
    context: dict[str, Any] | None = None
    previous_user_id: str | None = None


_decode_line = msgspec.json.Decoder(_Line).decode


def _send_line(tracker: Tracker, raw: bytes) -> str | None:
    """Queue the event of one JSONL line; return why it is bad, or None."""
    try:
        line = _decode_line(raw)
    except Exception:  # not a plain event (whatever msgspec raised): `_check_line` says why
        return _check_line(tracker, raw)
    if line.previous_user_id is not None or line.event_name == "identify":
        return _check_line(tracker, raw)
    try:
        tracker.track(
            line.user_id,
            line.event_name,
            item_id=line.item_id,
            event_family=line.event_family,
            session_id=line.session_id,
            recommendation_id=line.recommendation_id,
            context=line.context,
        )
    except InvalidEventError as exc:
        return str(exc)
    return None


def _check_line(tracker: Tracker, raw: bytes) -> str | None:
    """`_send_line` for any bytes: queue the event, or say what is wrong with the line."""
    try:
        obj = _decode(raw)
    except Exception:  # the kind of fault is ours to tell, whatever msgspec raised
        return f"not valid JSON ({_json_fault(raw)})"
    if obj.__class__ is not dict:
        return f"not a JSON object but {_JSON_TYPES.get(type(obj), 'something else')}"
    if not _FIELDS.issuperset(obj):
        return f"unknown field(s): {', '.join(sorted(set(obj) - _FIELDS))}"
    user_id, name = obj.pop("user_id", None), obj.pop("event_name", None)
    try:
        if name == "identify":
            for field in ("item_id", "recommendation_id"):
                if obj.get(field) is not None:
                    return f"{field}: not allowed on identify events"
            if obj.get("event_family") not in (None, "system"):
                return "event_family: identify events are in the system family"
            tracker.identify(
                user_id,
                obj.get("previous_user_id"),  # type: ignore[arg-type]  # identify() checks
                session_id=obj.get("session_id"),
                context=obj.get("context"),
            )
        elif obj.pop("previous_user_id", None) is not None:
            return "previous_user_id: only allowed on identify events"
        else:
            tracker.track(user_id, name, **obj)
    except InvalidEventError as exc:
        return str(exc)
    return None


_STRING = re.compile(rb'"(?:[^"\\\\]|\\\\.)*"?')  # a JSON string, or the unclosed tail of one
MAX_LINE_DEPTH = 512  # arrays and objects in one another, at most, that `send` reads


def _json_fault(raw: bytes) -> str:
    """What is wrong with ``raw``, which did not decode as JSON: said in our own words,
    never in a dependency's (its exceptions and wording change between releases)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}"
    if raw.count(b"[") + raw.count(b"{") <= MAX_LINE_DEPTH:
        return "malformed"
    depth = deepest = 0
    for byte in _STRING.sub(b"", raw):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    if deepest > MAX_LINE_DEPTH:
        return "nested too deeply"
    return "malformed"


def _context_key(context: object) -> bytes | None:
    if context is None:
        return None
    try:
        return msgspec.json.encode(context)
    except Exception:  # unencodable: the tracker reports it as an EncodeError
        return repr(context).encode("utf-8", "backslashreplace")


def _event_key(event: Event) -> tuple[object, ...]:
    """What tells events apart, from a queued `Event` (see `_line_key`)."""
    return (
        event.user_id,
        event.event_name,
        event.item_id,
        event.session_id,
        event.recommendation_id,
        event.previous_user_id,
        _context_key(event.context),
    )


def _line_key(obj: dict[str, Any]) -> tuple[object, ...]:
    """The same as `_event_key`, from the decoded line the event was made of."""
    return (
        obj.get("user_id"),
        obj.get("event_name"),
        obj.get("item_id"),
        obj.get("session_id"),
        obj.get("recommendation_id"),
        obj.get("previous_user_id"),
        _context_key(obj.get("context")),
    )


def _ranges(lines: Iterable[int]) -> list[list[int]]:
    """Sorted line numbers as ``[first, last]`` ranges."""
    out: list[list[int]] = []
    for n in sorted(set(lines)):
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def _show(ranges: list[list[int]]) -> str:
    """``line 7`` or ``lines 3-5, 9``."""
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges]
    if len(parts) == 1 and ranges[0][0] == ranges[0][1]:
        return f"line {parts[0]}"
    return "lines " + ", ".join(parts)


class _Chunk:
    """Lines read together, until every event tracked from them is settled."""

    __slots__ = ("first", "index", "last", "lines", "untracked")

    def __init__(self, first: int, lines: list[bytes]) -> None:
        self.first = first  # the line number of lines[0]
        self.last = first + len(lines) - 1
        self.lines = lines
        self.untracked: set[int] = set()  # blank, bad or skipped lines
        self.index: dict[tuple[object, ...], list[int]] | None = None

    def take_line(self, key: tuple[object, ...]) -> int | None:
        """The first line of this chunk not yet taken whose event has this key."""
        if self.index is None:  # built on the first failure only
            self.index = {}
            for i, raw in enumerate(self.lines):
                n = self.first + i
                if n in self.untracked:
                    continue
                obj = _decode(raw)  # a line that was tracked: a JSON object
                self.index.setdefault(_line_key(obj), []).append(n)
            for numbers in self.index.values():
                numbers.reverse()  # pop() takes the first
        found = self.index.get(key)
        return found.pop() if found else None
