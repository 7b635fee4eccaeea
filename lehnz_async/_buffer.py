"""The buffer between `track()` and the flusher: the event queue, its bound, and wake-ups.

`track()` appends to ``events`` directly while ``len(events) < threshold`` (its fast
path) and calls `Buffer.put` otherwise. The threshold is ``max_batch_size - 1`` while a
flusher runs (the event that fills a batch wakes the flusher), ``max_queue_size`` once
the flusher was woken, and 0 when no flusher runs, so every unusual case is decided off
the hot path.

Freezing (issue 19): unless a ``before_send`` hook will read them, the contexts of events
that wait are encoded early, every `FREEZE_EVERY` events, by a call on the loop that the
slow path schedules (`freeze_waiting`); so the caller's dicts are freed with their
requests rather than when their batch settles.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from itertools import islice, repeat, starmap

import msgspec

from ._batch import EVENT_OVERHEAD
from ._config import Config
from ._event import Event, encoder
from ._ledger import Ledger

logger = logging.getLogger("lehnz_async")

_DROP_LOG_INTERVAL = 10.0  # seconds between two warnings about a full queue
#: Events refused for the byte budget between two measurements of the event at hand.
REMEASURE_EVERY = 64
#: Events that may wait with their caller's context dict before a freeze is scheduled
#: (`Buffer.freeze_waiting`), well under CPython's gen-0 threshold of 700 allocations.
FREEZE_EVERY = 128
#: Most events one freeze encodes (~0.25 µs each: the loop is held at most ~0.5 ms).
FREEZE_MAX = 2048


class Buffer:
    """Events waiting to be cut into batches.

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
        "_max_batch_bytes",
        "_max_bytes",
        "_refusals",
        "append",
        "compact_every",
        "event_bytes",
        "events",
        "freeze",
        "freezing",
        "staged",
        "threshold",
        "wake",
    )

    def __init__(self, config: Config, ledger: Ledger) -> None:
        self.events: deque[Event] = deque()
        self.append = self.events.append
        #: events taken off ``events`` (through before_send) that wait for the next batch
        self.staged: deque[Event] = deque()
        self.threshold = 0
        #: wakes the running flusher, from any thread (set by the loop binding)
        self.wake: Callable[[], None] = lambda: None
        #: has the flusher freeze what waits (`Flusher.freeze`), from any thread: a call
        #: on its loop, scheduled by the loop binding; ``freezing`` while one is due
        self.freeze: Callable[[], None] = lambda: None
        self.freezing = False
        self._ledger = ledger
        self._max = config.max_queue_size
        self._max_bytes = config.max_buffer_bytes
        self._max_batch_bytes = config.max_batch_bytes
        self._batch_size = config.max_batch_size
        self._drop_oldest = config.overflow == "drop_oldest"
        self._last_drop_log = -_DROP_LOG_INTERVAL
        self._drops_since_log = 0
        self._refusals = 0
        #: bytes one queued event is reckoned to hold in memory (see `observe`)
        self.event_bytes = 0.0
        #: schedule a freeze each time this many events wait in ``events``
        #: (`freeze_waiting`); 0: never (a before_send hook reads the contexts)
        self.compact_every = FREEZE_EVERY if config.before_send is None else 0

    def __len__(self) -> int:
        return len(self.events)

    def observe(self, body_size: int, n: int) -> None:
        """Learn the size of events from a batch (or one event) just encoded."""
        per_event = body_size / n + EVENT_OVERHEAD
        self.event_bytes = (
            per_event if not self.event_bytes else (0.8 * self.event_bytes + 0.2 * per_event)
        )

    def limit(self) -> int:
        """How many events may wait now: ``max_queue_size``, or fewer where the byte
        budget, less what batches in flight hold, allows fewer."""
        if not self.event_bytes:
            return self._max
        # cutting a batch adds its body to what its events held: keep room for the body
        # of the one being cut (the bodies of those cut before are in held_bytes)
        body = min(self._max_batch_bytes, self._batch_size * (self.event_bytes - EVENT_OVERHEAD))
        room = self._max_bytes - self._ledger.held_bytes - body
        return max(0, min(self._max, int(room / self.event_bytes)))

    @property
    def queued(self) -> int:
        """Events waiting to be cut into a batch."""
        return len(self.events) + len(self.staged)

    @property
    def queued_bytes(self) -> int:
        return int(self.queued * self.event_bytes)

    def put(self, event: Event, running: bool) -> None:
        """track()'s slow path, any thread: apply the bounds and the overflow policy, wake
        the flusher if a batch is ready and ``running``.

        It runs at least once every ``max_batch_size`` events, and then measures the event
        at hand, so that the byte budget holds even for a producer that never yields.
        """
        events, staged = self.events, self.staged
        limit = self.limit() - len(staged)
        if (running or not self.event_bytes) and len(events) < limit:
            with contextlib.suppress(Exception):  # unencodable: reported when it is cut
                self.observe(len(encoder.encode(event)), 1)
            limit = self.limit() - len(staged)
        if len(events) >= limit and limit + len(staged) < self._max and self._remeasure():
            # refused for bytes: every so often measure the event at hand anyway, so the
            # learnt size follows what is tracked now (small events after large ones)
            with contextlib.suppress(Exception):
                self.observe(len(encoder.encode(event)), 1)
            limit = self.limit() - len(staged)
        if len(events) >= limit:
            reason = "max_queue_size" if limit + len(staged) >= self._max else "max_buffer_bytes"
            if not self._drop_oldest:
                self._dropped(reason)
                return
            if self._ledger.drop_oldest(self.staged, events, reason):
                self._log_drop(self._ledger.dropped, reason)
        events.append(event)
        if running:
            n = len(events)
            if n + len(staged) >= self._batch_size:
                self.threshold = min(limit, n + self._batch_size)  # look again a batch on
                self.wake()
            elif self.compact_every and n >= self.compact_every:
                self.threshold = min(limit, n + self.compact_every)
            else:
                self.threshold = min(limit, self._next_stop(self._batch_size - 1))
                return
            if self.compact_every and not self.freezing:  # (also while no worker is free
                self.freezing = True  # to take the full batch: what waits is frozen)
                self.freeze()

    def _remeasure(self) -> bool:
        """One refusal in `REMEASURE_EVERY` (a drop storm does not encode every event)."""
        self._refusals += 1
        return self._refusals % REMEASURE_EVERY == 1

    def open(self) -> None:
        """A flusher runs, or drained: let track() wake it again when a batch is full
        (the event that fills it takes the slow path, which wakes the flusher)."""
        self.threshold = min(
            self.limit() - len(self.staged),
            self._next_stop(len(self.events) + self._batch_size - 1),
        )

    def _next_stop(self, full: int) -> int:
        """The length of ``events`` at which track() next takes the slow path: ``full``
        (a batch is ready), or sooner when freezing: once a batch is, counting what is
        staged, or ``compact_every`` events wait unfrozen."""
        if not self.compact_every:
            return full
        n = len(self.events)
        stop = min(self._batch_size - len(self.staged), self.compact_every) - 1
        # a full batch already waits (no worker free yet): the next freeze as many on
        return stop if stop > n else n + self.compact_every - 1

    def freeze_waiting(self) -> None:
        """Encode the context of each event waiting in ``events`` now and keep it as its
        JSON (`msgspec.Raw`, which the batch's encode copies verbatim), moving the events
        to ``staged``: the caller's dict is then freed with its request, not with the
        batch. (CPython counts a dict towards its next gen-0 collection until it is
        freed: hundreds held by a queue make an app collect far more often, and promote
        its objects into full collections.) A context that cannot be encoded stays a
        dict, and its event is reported when its batch is cut. Loop thread only; other
        threads may append meanwhile."""
        n = min(len(self.events), FREEZE_MAX)  # the loop is never held long
        if not n:
            return
        ledger, staged = self._ledger, self.staged
        start = len(staged)
        ledger.moving()  # a window's end waits: the move is not seen half done
        try:  # popleft() n times, from C, each straight into staged: nothing in between
            staged.extend(starmap(self.events.popleft, repeat((), n)))
        except IndexError:  # another thread's drop_oldest took some meanwhile
            pass
        finally:
            ledger.moved()
        raw, encode = msgspec.Raw, encoder.encode
        for event in list(islice(staged, start, None)):  # (freezing any event is harmless)
            context = event.context
            if context.__class__ is dict:
                try:  # noqa: SIM105 - a try is cheaper than suppress() per event
                    event.context = raw(encode(context))  # type: ignore[assignment]
                except Exception:
                    pass  # reported when its batch is cut

    def shut(self) -> None:
        """No flusher runs: every track() takes the slow path."""
        self.threshold = 0

    def _dropped(self, reason: str) -> None:
        """The event at hand is refused at the door (drop_newest)."""
        self._log_drop(self._ledger.drop(1, taken=False, reason=reason), reason)

    def _log_drop(self, total: int, reason: str) -> None:
        """One more event dropped (``total`` in all): warn, at most every so often."""
        self._drops_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log < _DROP_LOG_INTERVAL:
            return
        dropped, self._drops_since_log = self._drops_since_log, 0
        self._last_drop_log = now
        logger.warning(
            "buffer full (%s: max_queue_size=%d, max_buffer_bytes=%d): dropped %d event(s) "
            "since the last warning, %d in all",
            reason,
            self._max,
            self._max_bytes,
            dropped,
            total,
        )
