"""The attribution loop: recommend, expose, click, purchase, attributed."""

from __future__ import annotations

import pytest

from lehnz_async import InvalidEventError, Recommendation, RecommendationError, Tracker
from lehnz_async._recommend import Attribution, resolve_recommend_url
from lehnz_async.testing import ReferenceServer, assert_tracked

from .conftest import assert_ledger

pytestmark = pytest.mark.anyio


async def seed_popularity(tracker: Tracker) -> None:
    for i, item in enumerate(["p1", "p2", "p2", "p3", "p3", "p3"]):
        tracker.track(f"seed_{i}", "view", item_id=item)
    await tracker.flush()


async def test_the_whole_loop_is_attributed(server: ReferenceServer) -> None:
    tracker = Tracker(server.api_key, endpoint=server.url, attribution_ttl=600)
    async with tracker:
        await seed_popularity(tracker)
        rec = await tracker.recommend("usr_1", limit=2)
        assert isinstance(rec, Recommendation)
        assert rec.all_item_ids == ["p3", "p2"]
        assert server.recommendations[rec.recommendation_id] == ["p3", "p2"]
        tracker.expose("usr_1", rec)
        tracker.track("usr_1", "click", item_id="p3")  # no recommendation_id given
        tracker.track("usr_1", "purchase", item_id="p3", context={"price": 5})
        tracker.track("usr_1", "view", item_id="p1")  # not recommended: not attributed
        tracker.track("usr_2", "click", item_id="p3")  # another user: not attributed
        tracker.track("usr_1", "click", item_id="p2", recommendation_id="rec_own")
    rid = rec.recommendation_id
    exposures = assert_tracked(server.events, event_family="exposure", count=2)
    assert [(e["item_id"], e["context"]["position"]) for e in exposures] == [("p3", 0), ("p2", 1)]
    assert all(e["recommendation_id"] == rid for e in exposures)
    assert_tracked(server.events, user_id="usr_1", event_name="click", recommendation_id=rid)
    assert_tracked(server.events, event_name="purchase", recommendation_id=rid, count=1)
    assert_tracked(server.events, user_id="usr_1", item_id="p1", recommendation_id=None)
    assert_tracked(server.events, user_id="usr_2", recommendation_id=None, count=1)
    assert_tracked(server.events, item_id="p2", recommendation_id="rec_own", count=1)
    assert_ledger(tracker.stats)


async def test_attribution_follows_identify_from_the_anonymous_id_to_the_user(
    server: ReferenceServer,
) -> None:
    """Shown recommendations while anonymous, signed in, then bought: attributed."""
    tracker = Tracker(server.api_key, endpoint=server.url, attribution_ttl=600)
    async with tracker:
        await seed_popularity(tracker)
        rec = await tracker.recommend("anon_1", limit=2)
        tracker.expose("anon_1", rec)
        own = await tracker.recommend("usr_1", limit=1)  # what the user was shown before
        tracker.identify("usr_1", previous_user_id="anon_1")
        for _ in range(250):
            tracker.track("usr_1", "purchase", item_id="p2", context={"price": 5})
        tracker.track("usr_1", "click", item_id="p3")  # shown to both: the fresher wins
        tracker.track("anon_1", "click", item_id="p3")  # the anonymous id keeps its own
        tracker.track("usr_2", "purchase", item_id="p2")  # someone else: not attributed
    rid = rec.recommendation_id
    assert own.recommendation_id != rid
    assert_tracked(server.events, event_name="purchase", recommendation_id=rid, count=250)
    assert own.all_item_ids == ["p3"]  # shown to usr_1 after rec: the fresher
    fresher = own.recommendation_id
    assert_tracked(server.events, user_id="usr_1", event_name="click", recommendation_id=fresher)
    assert_tracked(server.events, user_id="anon_1", event_name="click", recommendation_id=rid)
    assert_tracked(server.events, user_id="usr_2", recommendation_id=None, count=1)
    assert_ledger(tracker.stats)


async def test_without_attribution_nothing_is_filled_in(server: ReferenceServer) -> None:
    async with Tracker(server.api_key, endpoint=server.url) as tracker:
        await seed_popularity(tracker)
        rec = await tracker.recommend("usr_1")
        tracker.track("usr_1", "click", item_id=rec.all_item_ids[0])
    assert server.events[-1].get("recommendation_id") is None


async def test_recommend_errors_raise_with_the_status(server: ReferenceServer) -> None:
    async with ReferenceServer(api_keys={"lehnz_pk_other"}) as other:
        tracker = Tracker("lehnz_pk_mine", endpoint=other.url)
        async with tracker:
            with pytest.raises(RecommendationError) as info:
                await tracker.recommend("usr_1")
    assert info.value.status == 401
    assert info.value.server_message == "Missing or invalid X-API-KEY"
    async with Tracker(server.api_key, endpoint=server.url) as tracker:
        with pytest.raises(InvalidEventError, match="limit"):
            await tracker.recommend("usr_1", limit=0)
        with pytest.raises(InvalidEventError, match="user_id"):
            await tracker.recommend("")


def test_attribution_memory_is_bounded_in_time_and_users() -> None:
    now = [0.0]
    memory = Attribution(ttl=10.0, max_users=2, clock=lambda: now[0])
    memory.remember("u1", Recommendation("r1", ["a", "b"]))
    memory.remember("u2", Recommendation("r2", ["a"]))
    assert memory.lookup("u1", "a") == "r1"  # u1 is now the most recently used
    memory.remember("u3", Recommendation("r3", ["c"]))  # evicts u2
    assert memory.lookup("u2", "a") is None
    assert memory.lookup("u1", "b") == "r1" and len(memory) == 2
    now[0] = 10.5
    assert memory.lookup("u1", "a") is None  # expired


def test_the_recommend_url_follows_a_local_endpoint() -> None:
    assert resolve_recommend_url(None, "http://127.0.0.1:8080/api/v1/events/ingest") == (
        "http://127.0.0.1:8080/recommend"
    )
    assert resolve_recommend_url(None, "https://ingestion.lehnz.com/api/v1/events/ingest") == (
        "https://recommendations.lehnz.com/recommend"
    )
    assert resolve_recommend_url("http://x/r", "http://y/i") == "http://x/r"
