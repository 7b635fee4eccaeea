"""The wire event, its validation, and the one JSON encoder.

`Event` is exactly one element of the JSON array POSTed to the ingestion endpoint; fields
that are None are left out of the JSON. `track()` builds it directly when its arguments
are plain (the fast path) and calls `build_event` otherwise, which either normalizes the
arguments or raises `InvalidEventError` naming the field.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from ._exceptions import InvalidEventError

#: The four event families the endpoint accepts.
FAMILIES = ("exposure", "engagement", "conversion", "system")

#: Families of the documented standard event names, filled in when the caller gives none.
STANDARD_FAMILIES: dict[str, str] = {
    "view": "engagement",
    "search": "engagement",
    "click": "engagement",
    "add_to_cart": "engagement",
    "remove_from_cart": "engagement",
    "checkout_start": "conversion",
    "purchase": "conversion",
}

#: family -> family: a dict lookup that validates and raises KeyError in one step. It
#: lacks "system", so that system events take build_event()'s checks (identify needs a
#: previous_user_id).
FAST_FAMILIES: dict[str, str] = {f: f for f in FAMILIES if f != "system"}


class Event(msgspec.Struct, omit_defaults=True, gc=False):
    """One interaction event, as sent on the wire (None fields are omitted).

    ``gc=False``: an Event never takes part in a reference cycle (its only container
    field is ``context``, a user dict that cannot point back at the Event), so the
    garbage collector need not track the hundreds of thousands a burst can queue.
    """

    user_id: str
    event_family: str
    event_name: str
    item_id: str | None = None
    session_id: str | None = None
    recommendation_id: str | None = None
    context: dict[str, Any] | None = None
    previous_user_id: str | None = None


#: The one encoder; reused for every batch (msgspec's advice). ``order``: keys sorted,
#: which makes msgspec refuse a dict key that is not a str (an int key would otherwise
#: become a string silently, and ``{1: "a", "1": "b"}`` a duplicate JSON key);
#: ``decimal_format``: a Decimal is a JSON number of exactly its digits, as a price is.
encoder = msgspec.json.Encoder(order="deterministic", decimal_format="number")
_events_decoder = msgspec.json.Decoder(list[Event])


def _required_str(field: str, value: object) -> str:
    if value is None:
        raise InvalidEventError(field, "is required")
    if not isinstance(value, str):
        raise InvalidEventError(field, f"must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidEventError(field, "must not be empty")
    return str.__str__(value)


def _optional_str(field: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEventError(
            field, f"must be a str or None, not {type(value).__name__} (convert ids with str())"
        )
    return str.__str__(value)


def build_event(
    user_id: object,
    event_name: object,
    item_id: object = None,
    event_family: object = None,
    session_id: object = None,
    recommendation_id: object = None,
    context: object = None,
    previous_user_id: object = None,
) -> Event:
    """Validate and normalize `track()` arguments into an `Event`.

    Raises:
        InvalidEventError: naming the first field that is wrong.
    """
    uid = _required_str("user_id", user_id)
    name = _required_str("event_name", event_name)
    if name == "identify" and previous_user_id is None:
        raise InvalidEventError(
            "event_name",
            "identify events merge an anonymous id into a user: "
            "call identify(user_id, previous_user_id=...) instead",
        )
    if event_family is None:
        family = STANDARD_FAMILIES.get(name)
        if family is None:
            raise InvalidEventError(
                "event_family",
                f"custom event name {name!r} needs an event_family, one of "
                f"{', '.join(FAMILIES)} (only the standard names "
                f"{', '.join(STANDARD_FAMILIES)} have one filled in)",
            )
    else:
        if not isinstance(event_family, str) or event_family not in FAMILIES:
            raise InvalidEventError(
                "event_family", f"must be one of {', '.join(FAMILIES)}, got {event_family!r}"
            )
        family = str.__str__(event_family)
    ctx: dict[str, Any] | None
    if context is None:
        ctx = None
    elif isinstance(context, Mapping):
        if type(context) is dict:
            ctx = context
        else:
            try:
                ctx = dict(context)
            except Exception as exc:  # the mapping raised while being read
                raise InvalidEventError(
                    "context", f"could not be read as a mapping: {type(exc).__name__}: {exc}"
                ) from exc
    else:
        raise InvalidEventError(
            "context", f"must be a mapping (a dict) or None, not {type(context).__name__}"
        )
    return Event(
        uid,
        family,
        name,
        _optional_str("item_id", item_id),
        _optional_str("session_id", session_id),
        _optional_str("recommendation_id", recommendation_id),
        ctx,
        _optional_str("previous_user_id", previous_user_id),
    )


_PLAIN = (str, int, float, bool, type(None))


def context_fault(context: object) -> str | None:
    """What in ``context`` JSON cannot carry, named by its path (``context['when']:
    object values cannot be encoded as JSON``), or None if all of it can: what
    `encode_each` says of an event the encoder refused. (A NaN or infinity is carried as
    ``null``, as msgspec, orjson and the browser's ``JSON.stringify`` write it: refusing
    it would mean scanning every body, 30 µs a batch.)"""
    if context is None or context.__class__ is msgspec.Raw:  # frozen: encoded already
        return None
    return _fault(context, "context")


def _fault(value: object, path: str) -> str | None:
    kind = type(value)
    if kind in _PLAIN:
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path}: the key {key!r} is not a str ({type(key).__name__})"
            fault = _fault(item, f"{path}[{key!r}]")
            if fault is not None:
                return fault
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        for i, item in enumerate(value):
            fault = _fault(item, f"{path}[{i}]")
            if fault is not None:
                return fault
        return None
    try:
        encoder.encode(value)
        # a dataclass, attrs class or Struct: its fields, as the encoder sees them
        fields = msgspec.to_builtins(value, builtin_types=(decimal.Decimal,))
    except Exception as exc:
        return f"{path}: {kind.__name__} values cannot be encoded as JSON ({exc})"
    return _fault(fields, path) if isinstance(fields, dict) else None


def decode_events(body: bytes) -> list[Event]:
    """The events of a batch body (a spooled one, read back)."""
    return _events_decoder.decode(body)


def thaw(events: Iterable[Event]) -> None:
    """Give back as a dict each context the flusher froze into its JSON (`msgspec.Raw`):
    what on_error receives is what was tracked."""
    for event in events:
        context: object = event.context
        if isinstance(context, msgspec.Raw):
            event.context = msgspec.json.decode(context)
