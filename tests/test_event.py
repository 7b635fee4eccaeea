"""Call-site validation and the wire form of events (no I/O)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgspec
import pytest

from lehnz_async import Event, InvalidEventError, Tracker
from lehnz_async._event import STANDARD_FAMILIES, build_event, encoder


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("view", "engagement"),
        ("search", "engagement"),
        ("click", "engagement"),
        ("add_to_cart", "engagement"),
        ("remove_from_cart", "engagement"),
        ("checkout_start", "conversion"),
        ("purchase", "conversion"),
    ],
)
def test_standard_names_get_their_family(name: str, family: str) -> None:
    assert build_event("u", name).event_family == family
    assert STANDARD_FAMILIES[name] == family


def test_none_fields_are_left_out_of_the_json() -> None:
    assert encoder.encode(build_event("u", "view")) == (
        b'{"user_id":"u","event_family":"engagement","event_name":"view"}'
    )
    full = build_event("u", "purchase", "p", None, "s", "r", {"price": 49.99}, None)
    assert msgspec.json.decode(encoder.encode(full)) == {
        "user_id": "u",
        "event_family": "conversion",
        "event_name": "purchase",
        "item_id": "p",
        "session_id": "s",
        "recommendation_id": "r",
        "context": {"price": 49.99},
    }


def test_custom_name_keeps_the_given_family() -> None:
    event = build_event("u", "wishlist", event_family="engagement")
    assert (event.event_name, event.event_family) == ("wishlist", "engagement")


def test_a_mapping_context_is_copied_to_a_dict() -> None:
    event = build_event("u", "view", context=OrderedDict(a=1))
    assert type(event.context) is dict and event.context == {"a": 1}


def test_str_subclasses_are_normalized() -> None:
    class Name(str):
        pass

    event = build_event(Name("u"), Name("view"))
    assert type(event.user_id) is str and type(event.event_name) is str


BAD_CALLS: list[tuple[dict[str, Any], str]] = [
    ({"user_id": "", "event_name": "view"}, "user_id"),
    ({"user_id": None, "event_name": "view"}, "user_id"),
    ({"user_id": 17, "event_name": "view"}, "user_id"),
    ({"user_id": "u", "event_name": ""}, "event_name"),
    ({"user_id": "u", "event_name": None}, "event_name"),
    ({"user_id": "u", "event_name": ["view"]}, "event_name"),
    ({"user_id": "u", "event_name": "wishlist"}, "event_family"),
    ({"user_id": "u", "event_name": "view", "event_family": "fun"}, "event_family"),
    ({"user_id": "u", "event_name": "view", "event_family": ["x"]}, "event_family"),
    ({"user_id": "u", "event_name": "view", "event_family": "System"}, "event_family"),
    ({"user_id": "u", "event_name": "view", "context": [1, 2]}, "context"),
    ({"user_id": "u", "event_name": "view", "context": "price=3"}, "context"),
    ({"user_id": "u", "event_name": "view", "item_id": 42}, "item_id"),
    ({"user_id": "u", "event_name": "view", "session_id": 1.5}, "session_id"),
    ({"user_id": "u", "event_name": "view", "recommendation_id": b"r"}, "recommendation_id"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_CALLS)
def test_track_raises_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    tracker = Tracker(capture=True)
    user_id = kwargs.pop("user_id")
    event_name = kwargs.pop("event_name")
    with pytest.raises(InvalidEventError) as info:
        tracker.track(user_id, event_name, **kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(field)
    assert isinstance(info.value, ValueError)
    assert tracker.stats.tracked == 0


def test_identify_requires_previous_user_id() -> None:
    with Tracker(capture=True) as tracker:
        with pytest.raises(InvalidEventError, match="previous_user_id"):
            tracker.identify("usr_1", "")
        with pytest.raises(InvalidEventError, match=r"identify\(") as info:
            tracker.track("usr_1", "identify", event_family="system")
        assert info.value.field == "event_name"
        with pytest.raises(InvalidEventError, match=r"identify\("):
            tracker.track("usr_1", "identify")
        tracker.identify("usr_1", "anon_7")
        tracker.track("usr_1", "heartbeat", event_family="system")  # other system events
    assert tracker.stats.tracked == 2 and tracker.stats.delivered == 2


def test_event_is_a_struct_with_the_wire_fields() -> None:
    assert Event.__struct_fields__ == (
        "user_id",
        "event_family",
        "event_name",
        "item_id",
        "session_id",
        "recommendation_id",
        "context",
        "previous_user_id",
    )
