"""The buffer between `track()` and the flusher: the event queue, its bound, and wake-ups.

`track()` appends to ``events`` directly while ``len(events) < threshold`` (its fast
path) and calls `Buffer.put` otherwise. The threshold is ``max_batch_size - 1`` while a
flusher runs (the event that fills a batch wakes the flusher), ``max_queue_size`` once
the flusher was woken, and 0 when no flusher runs, so every unusual case is decided off
the hot path.

``batches`` holds batches that were cut before and wait to be sent again with their own
bytes and key: those a torn-down loop left in flight. The flusher sends them before it
cuts anything new.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from ._batch import Batch
from ._config import Config
from ._event import Event
from ._ledger import Ledger

logger = logging.getLogger("lehnz_async")

_DROP_LOG_INTERVAL = 10.0  # seconds between two warnings about a full queue


class Buffer:
    """Events waiting to be cut into batches, and batches waiting to be sent again.

    Args:
        config: The tracker's options (``max_queue_size``, ``max_batch_size``,
            ``overflow``).
        ledger: Where drops are counted.
    """

    __slots__ = (
        "_batch_size",
        "_drop_oldest",
        "_drops_since_log",
        "_last_drop_log",
        "_ledger",
        "_max",
        "append",
        "batches",
        "events",
        "threshold",
        "wake",
    )

    def __init__(self, config: Config, ledger: Ledger) -> None:
        self.events: deque[Event] = deque()
        self.append = self.events.append
        self.batches: deque[Batch] = deque()
        self.threshold = 0
        #: wakes the running flusher, from any thread (set by the loop binding)
        self.wake: Callable[[], None] = lambda: None
        self._ledger = ledger
        self._max = config.max_queue_size
        self._batch_size = config.max_batch_size
        self._drop_oldest = config.overflow == "drop_oldest"
        self._last_drop_log = -_DROP_LOG_INTERVAL
        self._drops_since_log = 0

    def __len__(self) -> int:
        return len(self.events)

    def put(self, event: Event, running: bool) -> None:
        """track()'s slow path, any thread: apply the overflow policy, wake the flusher
        if a batch is ready and ``running``."""
        events = self.events
        if len(events) >= self._max:
            if not self._drop_oldest:
                self._dropped(taken=False)
                return
            try:
                events.popleft()
            except IndexError:  # emptied by the flusher meanwhile (another thread)
                pass
            else:
                self._dropped(taken=True)
        events.append(event)
        if running and len(events) >= self._batch_size:
            self.threshold = self._max
            self.wake()

    def open(self) -> None:
        """A flusher runs, or drained: let track() wake it again when a batch is full
        (the event that fills it takes the slow path, which wakes the flusher)."""
        self.threshold = self._batch_size - 1

    def shut(self) -> None:
        """No flusher runs: every track() takes the slow path."""
        self.threshold = 0

    def _dropped(self, taken: bool) -> None:
        total = self._ledger.drop(1, taken=taken)
        self._drops_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log < _DROP_LOG_INTERVAL:
            return
        dropped, self._drops_since_log = self._drops_since_log, 0
        self._last_drop_log = now
        logger.warning(
            "queue full (max_queue_size=%d): dropped %d event(s) since the last warning, %d in all",
            self._max,
            dropped,
            total,
        )
