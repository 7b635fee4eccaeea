"""before_send: scrub, enrich or drop events in the flusher, over real HTTP."""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec
import pytest

from lehnz_async import DeliveryError, Event, Tracker
from lehnz_async.testing import ReferenceServer

from .conftest import Errors, assert_ledger, track_many

pytestmark = pytest.mark.anyio

MakeTracker = Callable[..., Tracker]


def scrub(event: Event) -> Event | None:
    """The README's recipe: no e-mail addresses leave the process; the app's version goes
    along; internal test users are not sent at all."""
    if event.user_id.startswith("test_"):
        return None
    context = dict(event.context or {})
    context.pop("email", None)
    context["app_version"] = "2.3.1"
    return msgspec.structs.replace(event, context=context)


async def test_a_hook_scrubs_enriches_and_drops(
    server: ReferenceServer, make_tracker: MakeTracker
) -> None:
    async with make_tracker(before_send=scrub, max_batch_size=7) as tracker:
        for i in range(20):
            tracker.track(f"usr_{i}", "view", context={"email": f"u{i}@example.com", "page": "p"})
        for i in range(5):
            tracker.track(f"test_{i}", "view")
    assert len(server.events) == 20
    assert all("email" not in e["context"] for e in server.events)
    assert all(e["context"] == {"page": "p", "app_version": "2.3.1"} for e in server.events)
    stats = tracker.stats
    assert (stats.delivered, stats.dropped, stats.drops) == (20, 5, {"before_send": 5})
    assert_ledger(stats)


async def test_a_hook_that_raises_sends_nothing_of_that_event_and_reports_it_once(
    server: ReferenceServer,
    make_tracker: MakeTracker,
    errors: Errors,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def picky(event: Event) -> Event:
        if event.item_id == "prod_3":
            raise ValueError("cannot scrub this one")
        return event

    with caplog.at_level(logging.DEBUG, "lehnz_async"):
        async with make_tracker(before_send=picky) as tracker:
            track_many(tracker, 200)  # item ids prod_(i % 97): prod_3 three times
    refused = ["usr_3", "usr_100", "usr_197"]
    assert [e.user_id for e in errors.events] == refused
    assert all(isinstance(e.__cause__, ValueError) for e in errors)
    assert all(type(e) is DeliveryError for e in errors)
    expected = {f"usr_{i}" for i in range(200)} - set(refused)
    assert {e["user_id"] for e in server.events} == expected
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1 and "before_send" in loud[0].message  # once; later ones at DEBUG
    assert (tracker.stats.failed, tracker.stats.delivered) == (3, 197)


async def test_a_hook_returning_something_else_is_an_error_not_a_crash(
    server: ReferenceServer, make_tracker: MakeTracker, errors: Errors
) -> None:
    async with make_tracker(before_send=lambda event: {"user_id": "x"}) as tracker:
        track_many(tracker, 3)
    assert len(errors.events) == 3 and "not an Event" in str(errors[0])
    assert server.events == []
