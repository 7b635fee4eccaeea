"""lehnz_async: the asyncio event tracker for the Lehnz recommendations service."""

from .__about__ import __version__
from ._config import DEFAULT_INGEST_URL
from ._event import Event
from ._exceptions import (
    AuthenticationError,
    BlockingCallError,
    ConfigurationError,
    DeliveryError,
    EncodeError,
    InvalidEventError,
    LehnzError,
    RecommendationError,
    RejectedError,
    RetriesExhaustedError,
    ShutdownError,
    TrackerClosedError,
)
from ._marks import Mark, Receipt
from ._recommend import Recommendation
from ._retry import RetryPolicy
from ._stats import Stats
from ._tracker import Tracker
from ._watchdog import Health

__all__ = [
    "DEFAULT_INGEST_URL",
    "AuthenticationError",
    "BlockingCallError",
    "ConfigurationError",
    "DeliveryError",
    "EncodeError",
    "Event",
    "Health",
    "InvalidEventError",
    "LehnzError",
    "Mark",
    "Receipt",
    "Recommendation",
    "RecommendationError",
    "RejectedError",
    "RetriesExhaustedError",
    "RetryPolicy",
    "ShutdownError",
    "Stats",
    "Tracker",
    "TrackerClosedError",
    "__version__",
]
