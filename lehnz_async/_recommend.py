"""The attribution loop: ``/recommend`` answers, and which item came from which answer.

`Attribution` remembers, per user, the items of the recommendations that user was shown,
for ``ttl`` seconds and for at most ``max_users`` users (least recently used go first),
so that a later event about one of those items carries its ``recommendation_id``.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import msgspec

from ._exceptions import RecommendationError
from ._transport import BatchTransport, TransportFailure, error_message

#: The documented recommendations URL.
DEFAULT_RECOMMEND_URL = "https://recommendations.lehnz.com/recommend"


class Recommendation(msgspec.Struct, frozen=True):
    """What ``/recommend`` answered (fields beyond these are ignored)."""

    #: The id to put on events about these items (attribution).
    recommendation_id: str
    #: The recommended item ids, best first.
    all_item_ids: list[str]
    #: The user it was computed for, if the service says.
    user_id: str | None = None


recommendation_decoder = msgspec.json.Decoder(Recommendation)


def resolve_recommend_url(recommend_endpoint: str | None, ingest_endpoint: str) -> str:
    """The URL given, else the documented one, else ``/recommend`` on the ingest host.

    A tracker pointed at a local reference server (``LEHNZ_ENDPOINT``) thus asks the same
    server for recommendations.
    """
    if recommend_endpoint is not None:
        return recommend_endpoint
    from ._config import DEFAULT_INGEST_URL

    if ingest_endpoint == DEFAULT_INGEST_URL:
        return DEFAULT_RECOMMEND_URL
    parts = urlsplit(ingest_endpoint)
    return f"{parts.scheme}://{parts.netloc}/recommend"


class Attribution:
    """user -> item -> (recommendation_id, expiry), bounded in time and in users.

    Thread-safe: `lookup` runs in track(), from any thread.
    """

    def __init__(
        self, ttl: float, max_users: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._max_users = max_users
        self._clock = clock
        self._lock = threading.Lock()
        # user_id -> {item_id: (recommendation_id, expires_at)}, least recently used first
        self._users: collections.OrderedDict[str, dict[str, tuple[str, float]]] = (
            collections.OrderedDict()
        )

    def remember(self, user_id: str, recommendation: Recommendation) -> None:
        expires = self._clock() + self._ttl
        rec_id = recommendation.recommendation_id
        with self._lock:
            items = self._users.pop(user_id, None) or {}
            for item in recommendation.all_item_ids:
                items[item] = (rec_id, expires)
            self._users[user_id] = items
            while len(self._users) > self._max_users:
                self._users.popitem(last=False)

    def merge(self, previous_user_id: str, user_id: str) -> None:
        """``identify()``: what was shown to ``previous_user_id`` (the anonymous id) is
        remembered for ``user_id`` too, so that a purchase after sign-in is attributed
        (where both saw an item, the fresher recommendation wins)."""
        with self._lock:
            previous = self._users.get(previous_user_id)
            if not previous:
                return
            items = self._users.pop(user_id, None) or {}
            for item, entry in previous.items():
                mine = items.get(item)
                if mine is None or mine[1] < entry[1]:
                    items[item] = entry
            self._users[user_id] = items
            while len(self._users) > self._max_users:
                self._users.popitem(last=False)

    def lookup(self, user_id: str, item_id: str) -> str | None:
        """The recommendation that showed ``item_id`` to ``user_id``, if still fresh."""
        with self._lock:
            items = self._users.get(user_id)
            if items is None:
                return None
            entry = items.get(item_id)
            if entry is None:
                return None
            if entry[1] < self._clock():
                del items[item_id]
                if not items:
                    del self._users[user_id]
                return None
            self._users.move_to_end(user_id)
            return entry[0]

    def __len__(self) -> int:
        return len(self._users)


class Recommender:
    """``recommend()`` over a connection pool of its own, apart from the uploads', so that
    a backlog of batches never delays an answer a page is waiting for.

    Args:
        url: The ``/recommend`` URL.
        transport: Its own transport (or a capture stand-in that refuses).
        attribution: Where answers are remembered, if attribution is on.
    """

    def __init__(
        self, url: str, transport: BatchTransport, attribution: Attribution | None
    ) -> None:
        self.url = url
        self.transport = transport
        self.attribution = attribution

    async def recommend(self, user_id: str, body: bytes) -> Recommendation:
        """One POST to ``/recommend``; on the tracker's loop.

        Raises:
            RecommendationError: no answer, a non-2xx answer, or an unreadable one.
        """
        await self.transport.open()
        try:
            status, payload = await self.transport.call(self.url, body)
        except TransportFailure as exc:
            raise RecommendationError(f"/recommend did not answer: {exc}") from exc
        if not 200 <= status < 300:
            message = error_message(payload)
            raise RecommendationError(
                f"/recommend answered {status}: {message}", status=status, server_message=message
            )
        try:
            result = recommendation_decoder.decode(payload)
        except Exception as exc:
            raise RecommendationError(
                f"/recommend answered something unreadable: {error_message(payload)}"
            ) from exc
        if self.attribution is not None:
            self.attribution.remember(user_id, result)
        return result
