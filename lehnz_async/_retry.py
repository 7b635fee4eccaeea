"""The retry policy, backoff and Retry-After arithmetic; all durations in float seconds.

The backoff is "full jitter": the n-th retry (n >= 1) waits a uniformly random time in
``[0, min(max_delay, base_delay * 2 ** (n - 1))]``, which spreads a fleet of clients that
failed together instead of having them retry in lockstep.
"""

from __future__ import annotations

import dataclasses
import email.utils
import math
import random
from collections.abc import Callable

from ._config import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_RETRY_TIME,
    DEFAULT_RETRY_BASE_DELAY,
    DEFAULT_RETRY_MAX_DELAY,
    positive_float,
    positive_int,
)
from ._exceptions import ConfigurationError

#: Statuses that are worth sending again unchanged.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How a batch is retried after a retryable failure (408, 429, 5xx, timeouts, resets).

    Usage::

        Tracker(retry=RetryPolicy(max_attempts=20, max_time=300.0))

    Attributes:
        max_attempts: Attempts per batch, the first included.
        max_time: Seconds after a batch's first attempt when no retry starts any more.
        base_delay: Backoff ceiling of the first retry; it doubles each retry.
        max_delay: Cap of the backoff ceiling (``Retry-After`` is obeyed as sent).

    Raises:
        ConfigurationError: a value that is not a positive int (``max_attempts``) or a
            positive finite number of seconds, naming the field.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_time: float = DEFAULT_MAX_RETRY_TIME
    base_delay: float = DEFAULT_RETRY_BASE_DELAY
    max_delay: float = DEFAULT_RETRY_MAX_DELAY

    def __post_init__(self) -> None:
        positive_int("RetryPolicy.max_attempts", self.max_attempts)
        for name in ("max_time", "base_delay", "max_delay"):
            positive_float(f"RetryPolicy.{name}", getattr(self, name))
        if self.base_delay > self.max_delay:
            raise ConfigurationError(
                f"RetryPolicy.base_delay ({self.base_delay}) must not exceed "
                f"RetryPolicy.max_delay ({self.max_delay})"
            )

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before the ``retry``-th retry (1-based), with full jitter."""
        return backoff_delay(retry, self.base_delay, self.max_delay, rand)


def backoff_delay(
    retry: int,
    base_delay: float,
    max_delay: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the ``retry``-th retry (1-based), with full jitter."""
    ceiling = min(max_delay, base_delay * 2.0 ** min(retry - 1, 62))
    return rand() * ceiling


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait, or None if absent or unreadable.

    Args:
        value: The header, either delta-seconds (``"120"``) or an HTTP date.
        now: The current time as a Unix timestamp (``time.time()``), for HTTP dates.

    A date in the past means "now" (0.0); negative or non-finite numbers are unreadable.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are always GMT
            return None
        return max(0.0, when.timestamp() - now)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
