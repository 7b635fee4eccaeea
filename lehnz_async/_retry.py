"""Backoff and Retry-After arithmetic; pure functions, all durations in float seconds.

The backoff is "full jitter": the n-th retry (n >= 1) waits a uniformly random time in
``[0, min(max_delay, base_delay * 2 ** (n - 1))]``, which spreads a fleet of clients that
failed together instead of having them retry in lockstep.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Callable

#: Statuses that are worth sending again unchanged.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


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
