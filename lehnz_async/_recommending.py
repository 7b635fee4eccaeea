"""Recommendations: `Tracker.recommend` and `Tracker.expose` (the ``track()`` that fills
in ``recommendation_id`` when attribution is on stays with the hot path). A mixin of
`Tracker`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from ._binding import LoopBinding
from ._exceptions import InvalidEventError, TrackerClosedError
from ._recommend import Recommendation, Recommender

if TYPE_CHECKING:
    from ._config import Config


class Recommending:
    """The recommendation half of `Tracker` (whose attributes these are)."""

    _config: Config
    _binding: LoopBinding
    _recommender: Recommender

    track: Callable[..., None]  # (Tracker.track)

    def expose(
        self,
        user_id: str,
        recommendation: Recommendation,
        *,
        item_ids: Sequence[str] | None = None,
        session_id: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue one ``exposure`` event per item of ``recommendation`` that was shown.

        Each carries the ``recommendation_id`` and its ``position`` (0-based) in the
        answer in its context, merged over ``context``.

        Args:
            user_id: Who was shown the items.
            recommendation: What `recommend()` returned.
            item_ids: The items actually shown, if not all of them.
            session_id: The browsing session.
            context: Extra context for every exposure event (page, slot, ...).
        """
        shown = recommendation.all_item_ids if item_ids is None else item_ids
        position = {item: i for i, item in enumerate(recommendation.all_item_ids)}
        for item in shown:
            self.track(
                user_id,
                "exposure",
                event_family="exposure",
                item_id=item,
                session_id=session_id,
                recommendation_id=recommendation.recommendation_id,
                context={**(context or {}), "position": position.get(item)},
            )

    async def recommend(self, user_id: str, *, limit: int = 12, **params: Any) -> Recommendation:
        """Ask ``/recommend`` for items for ``user_id`` (one request, no retry).

        It goes over a connection pool of its own, so batches in flight never delay it.
        With ``attribution_ttl`` set, the answer's items are remembered for the user, so
        that later events about them carry its ``recommendation_id``.

        Args:
            user_id: The user to recommend for.
            limit: How many items to ask for.
            **params: Further documented request fields, sent as they are.

        Raises:
            InvalidEventError: ``user_id`` or ``limit`` is unusable.
            TrackerClosedError: the tracker was closed.
            RecommendationError: no answer, a non-2xx answer, or an unreadable one.
        """
        if self._binding.closing:
            raise TrackerClosedError("recommend() on a closed Tracker; create a new Tracker")
        if type(user_id) is not str or not user_id:
            raise InvalidEventError("user_id", "must be a non-empty str")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidEventError("limit", f"must be a positive int, got {limit!r}")
        body = msgspec.json.encode({**params, "user_id": user_id, "limit": limit})
        recommender = self._recommender
        return await self._binding.on_loop(lambda: recommender.recommend(user_id, body))
