"""`assert_tracked`: what a test asserts of the events a tracker sent."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._event import Event
    from .._tracker import Tracker


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
    from .._tracker import Tracker

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
