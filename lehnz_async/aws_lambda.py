"""AWS Lambda: a handler wrapper that delivers before each invocation returns.

::

    from lehnz_async import Tracker
    from lehnz_async.aws_lambda import lehnz_handler

    @lehnz_handler(lambda: Tracker(spool_path="/tmp/lehnz_async-spool.sqlite"))
    def handler(event, context, tracker):
        tracker.track(event["user"], "view", item_id=event["item"])
        return {"ok": True}

Lambda freezes the execution environment as soon as the handler returns, and may never
thaw it, so a background flush cannot be counted on. The wrapper keeps one tracker per
execution environment (warm invocations reuse it, with its keep-alive connections) and,
when the handler returns or raises, flushes it within the invocation's remaining time
(``context.get_remaining_time_in_millis()``) less ``margin`` seconds. What it cannot send
in that time is written to the tracker's spool (in ``/tmp``) and the tracker is closed;
the next invocation in the same environment makes a new tracker, which re-sends the
spool, and waits for those batches too before it returns.

Connections the server closed while the environment was frozen are noticed by the
transport when it thaws: the first request after a thaw opens a new connection, and is
neither lost nor counted as an outage.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ._exceptions import ConfigurationError
from ._tracker import Tracker

if TYPE_CHECKING:
    import sqlite3

__all__ = ["DEFAULT_MARGIN", "DEFAULT_SPOOL_PATH", "LambdaHandler", "lehnz_handler", "wrap"]

logger = logging.getLogger("lehnz_async")

_R = TypeVar("_R")

#: Seconds of each invocation's remaining time left for what follows the flush: writing
#: the spool, the runtime posting the response.
DEFAULT_MARGIN = 0.5
#: The spool of the tracker `lehnz_handler()` makes when it is given no factory.
DEFAULT_SPOOL_PATH = "/tmp/lehnz_async-spool.sqlite"
#: Seconds between two looks at the spool while re-sent batches are awaited.
_SPOOL_POLL = 0.01


class LambdaContext(Protocol):
    """What the wrapper uses of Lambda's context object."""

    def get_remaining_time_in_millis(self) -> int: ...


class LambdaHandler(Generic[_R]):
    """A Lambda handler ``(event, context)`` around ``handler(event, context, tracker)``;
    made by `lehnz_handler` or `wrap`.

    Attributes:
        tracker: The current tracker (None before the first invocation, and after a
            flush ran out of time, until the next invocation makes a new one).
        invocations: Invocations handled in this execution environment.
    """

    def __init__(
        self,
        handler: Callable[[Any, Any, Tracker], _R],
        make_tracker: Callable[[], Tracker],
        margin: float,
        max_flush_time: float | None,
    ) -> None:
        if not margin >= 0:
            raise ConfigurationError(f"margin must be >= 0 seconds, not {margin!r}")
        if max_flush_time is not None and not max_flush_time >= 0:
            raise ConfigurationError(
                f"max_flush_time must be >= 0 seconds or None, not {max_flush_time!r}"
            )
        self._handler = handler
        self._make_tracker = make_tracker
        self._margin = margin
        self._max_flush_time = max_flush_time
        self._lock = threading.Lock()
        self.tracker: Tracker | None = None
        self.invocations = 0
        #: Spool rows (up to this id) the current tracker re-sends; 0 when none.
        self._replaying = 0
        functools.update_wrapper(self, handler)

    def __call__(self, event: Any, context: Any) -> _R:
        tracker = self._current()
        self.invocations += 1
        try:
            return self._handler(event, context, tracker)
        finally:
            self._settle(tracker, context)

    # -- the tracker's life ---------------------------------------------------------------

    def _current(self) -> Tracker:
        """The tracker of this environment; a new one after a close (it re-sends the
        spool), started on a loop thread of its own."""
        with self._lock:
            tracker = self.tracker
            if tracker is None or tracker.closed:
                tracker = self._make_tracker()
                if not isinstance(tracker, Tracker):
                    raise ConfigurationError(
                        f"the tracker factory returned {type(tracker).__name__}, not a Tracker"
                    )
                path = tracker._config.spool_path
                if path is None:
                    logger.warning(
                        "the Lambda tracker has no spool_path: events it cannot send "
                        "before an invocation's deadline are reported to on_error as "
                        "ShutdownError; pass spool_path='/tmp/...' to keep them"
                    )
                self._replaying = _last_spool_row(path) if path is not None else 0
                # start it here, where no event loop runs: a loop of the handler's own
                # (asyncio.run) would stop it when it returns
                tracker.__enter__()
                self.tracker = tracker
            return tracker

    def _settle(self, tracker: Tracker, context: Any) -> None:
        """Deliver what the invocation tracked before it returns; spool what cannot be."""
        deadline = time.monotonic() + self._budget(context)
        try:
            tracker.flush_sync(max(0.0, deadline - time.monotonic()))
            self._await_replay(tracker, deadline)
        except TimeoutError:
            pass
        stats = tracker.stats
        if stats.queued or stats.in_flight or self._replaying:
            logger.warning(
                "%d event(s) not delivered before the invocation's deadline (%.2f s left "
                "after the flush): spooling them for the next invocation",
                stats.queued + stats.in_flight,
                _remaining(context),
            )
            with self._lock:
                self.tracker = None
            tracker.close(timeout=0.0)  # spools what is unsettled, at once

    def _budget(self, context: Any) -> float:
        """Seconds the flush may take in this invocation."""
        budget = _remaining(context) - self._margin
        if self._max_flush_time is not None:
            budget = min(budget, self._max_flush_time)
        return max(0.0, budget)

    def _await_replay(self, tracker: Tracker, deadline: float) -> None:
        """A new tracker re-sends the spool as it starts: wait until those rows are
        delivered (and deleted) too, within ``deadline``.

        Raises:
            TimeoutError: the deadline passed first.
        """
        path = tracker._config.spool_path
        while self._replaying and path is not None:
            if not _spool_has_rows(path, self._replaying):
                self._replaying = 0
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            # re-sent batches join the ledger once read back: a flush waits for them
            tracker.flush_sync(remaining)
            if _spool_has_rows(path, self._replaying):
                time.sleep(min(_SPOOL_POLL, max(0.0, deadline - time.monotonic())))


def _remaining(context: Any) -> float:
    return float(context.get_remaining_time_in_millis()) / 1000.0


def _connect(path: str) -> sqlite3.Connection | None:
    """The spool file, read-only; None if it does not exist (yet)."""
    if not os.path.exists(path):
        return None
    import sqlite3  # here: a tracker without a spool never needs it

    try:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None


def _last_spool_row(path: str) -> int:
    """The highest row id of the spool file (0 if it has none)."""
    db = _connect(path)
    if db is None:
        return 0
    try:
        row = db.execute("SELECT COALESCE(MAX(id), 0) FROM batches").fetchone()
        return int(row[0])
    except db.Error:
        return 0
    finally:
        db.close()


def _spool_has_rows(path: str, up_to: int) -> bool:
    """Whether rows with id <= ``up_to`` are still in the spool."""
    db = _connect(path)
    if db is None:
        return False
    try:
        row = db.execute("SELECT COUNT(*) FROM batches WHERE id <= ?", (up_to,)).fetchone()
        return bool(row[0])
    except db.Error:
        return False
    finally:
        db.close()


def wrap(
    handler: Callable[[Any, Any, Tracker], _R],
    tracker: Callable[[], Tracker] | None = None,
    *,
    margin: float = DEFAULT_MARGIN,
    max_flush_time: float | None = None,
) -> LambdaHandler[_R]:
    """Wrap ``handler(event, context, tracker)`` into a Lambda handler ``(event, context)``.

    Args:
        handler: Your handler; it gets the tracker as its third argument.
        tracker: Makes the tracker (called at the first invocation, and again after a
            flush ran out of time); None makes ``Tracker(spool_path=DEFAULT_SPOOL_PATH)``
            (the key from ``LEHNZ_API_KEY``). Give it a ``spool_path`` in ``/tmp``.
        margin: Seconds of the invocation's remaining time kept for after the flush.
        max_flush_time: Most seconds a flush may take (None: the remaining time less
            ``margin``); a cap keeps an endpoint outage from billing the whole timeout.

    Raises:
        ConfigurationError: a negative ``margin`` or ``max_flush_time``.
    """
    make = tracker if tracker is not None else _default_tracker
    return LambdaHandler(handler, make, margin, max_flush_time)


def lehnz_handler(
    tracker: Callable[[], Tracker] | None = None,
    *,
    margin: float = DEFAULT_MARGIN,
    max_flush_time: float | None = None,
) -> Callable[[Callable[[Any, Any, Tracker], _R]], LambdaHandler[_R]]:
    """The decorator form of `wrap`: ``@lehnz_handler(make_tracker)``."""

    def decorate(handler: Callable[[Any, Any, Tracker], _R]) -> LambdaHandler[_R]:
        return wrap(handler, tracker, margin=margin, max_flush_time=max_flush_time)

    return decorate


def _default_tracker() -> Tracker:
    return Tracker(spool_path=DEFAULT_SPOOL_PATH)
