"""A tracker's life after `track()`: `Tracker.start`; what became of the events,
`Tracker.mark` (delivery receipts, `_marks`) and `Tracker.flush`; `Tracker.aclose` and
`Tracker.close`; and whether delivery works, `Tracker.health` (`_watchdog`). A mixin of
`Tracker`."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import anyio

from ._binding import LoopBinding, State
from ._config import positive_float
from ._exceptions import BlockingCallError, TrackerClosedError
from ._loop_thread import running_loop
from ._marks import Mark, Receipt, Window
from ._watchdog import Health, Watch, health_of

if TYPE_CHECKING:
    from ._buffer import Buffer
    from ._config import Config
    from ._health import Destination
    from ._ledger import Ledger
    from ._stats import Stats


class Lifecycle:
    """Start, marks, flushes, close and health of a `Tracker` (whose attributes these
    are)."""

    _config: Config
    _ledger: Ledger
    _buffer: Buffer
    _binding: LoopBinding
    _destination: Destination
    _watch: Watch | None

    if TYPE_CHECKING:

        @property
        def stats(self) -> Stats: ...

    def mark(self) -> Mark:
        """Mark the events tracked so far, to learn what becomes of them, without
        sending anything sooner: ``await mark.settled()`` returns a `Receipt` of the
        *window* this mark ends, the events tracked since the previous ``mark()`` or
        ``flush()`` of this tracker (or since it started). Cheap, any thread; a worker
        acknowledges its source messages once ``receipt.ok_to_ack``.

        Called from another thread while the flusher is taking events off the queue,
        it waits for that to finish (microseconds, or a ``before_send`` call), so that
        the window holds exactly the events tracked before it.
        """
        return Mark(self._close_window(), self._start_for_mark)

    def _close_window(self) -> Window:
        ledger, buffer, binding = self._ledger, self._buffer, self._binding
        inside = threading.get_ident() == binding._loop_thread
        while (window := ledger.close_window(lambda: buffer.queued, inside)) is None:
            time.sleep(0.0001)
        return window

    def _start_for_mark(self, blocking: bool) -> None:
        binding = self._binding
        if binding.closing:
            return
        loop = binding.serving_loop()
        if blocking and running_loop() is loop:
            raise BlockingCallError(
                "settled_sync() was called on the event loop that runs the tracker, where "
                "it would wait forever; await mark.settled() instead"
            )

    async def flush(self, timeout: float | None = None) -> Receipt:
        """Send what is queued at once, and return once every event tracked before this
        call is settled, with the `Receipt` of the events tracked since the previous
        `mark()` or ``flush()`` (or since the tracker started).

        Partial batches are sent at once instead of waiting for ``flush_interval``.
        During an outage nothing gives up, so without a ``timeout`` this waits until the
        endpoint is back. Returns at once on a closed tracker (its close settled
        everything).

        Raises:
            TimeoutError: not everything settled within ``timeout`` seconds (the events
                stay queued and in flight: nothing is given up).
        """
        if timeout is not None:
            positive_float("timeout", timeout)
        mark = self.mark()
        binding = self._binding
        try:
            with anyio.fail_after(timeout):
                if not binding.closing:
                    await binding.on_loop(binding.flush)
                return await mark.settled()
        except TimeoutError:
            raise TimeoutError(
                f"flush() did not settle everything within {timeout} s ({self.stats})"
            ) from None

    def flush_sync(self, timeout: float | None = None) -> Receipt:
        """The blocking form of `flush()`, for code that runs no event loop.

        Raises:
            TimeoutError: not everything settled within ``timeout`` seconds.
            BlockingCallError: called on the loop that runs the tracker.
        """
        mark = self.mark()
        binding = self._binding
        started = time.monotonic()
        if not binding.closing:
            binding.block_on_loop(binding.flush, timeout)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        return mark.settled_sync(left)

    def health(self) -> Health:
        """Whether delivery works: ``ok``, ``degraded`` (delivering, but events were
        lost in the last minute, or the spool was set aside) or ``down`` (closed, in an
        outage, or stalled: see ``stall_timeout``), with the reason, the age of the last
        2xx and the backlog. Cheap, any thread; made for a readiness probe."""
        return health_of(
            self._watch,
            self._ledger,
            self._buffer,
            self._destination,
            self._binding.state is State.CLOSED,
        )

    async def start(self) -> None:
        """Start the background flusher now (track() also starts it, lazily).

        Raises:
            TrackerClosedError: the tracker was closed; closed trackers cannot restart.
        """
        if self._binding.closing:
            raise TrackerClosedError(
                "this Tracker was closed and cannot be restarted; create a new Tracker"
            )
        self._binding.ensure_started()

    async def aclose(self, timeout: float | None = None) -> None:
        """Send what is queued, wait for it to settle, then release the HTTP sessions.

        Idempotent. The close runs to its deadline (``timeout``, default
        ``close_timeout``) whatever cancels the caller meanwhile (asyncio's
        ``wait_for``, ``timeout``, a TaskGroup, ``Task.cancel()``, or an anyio cancel
        scope); then the cancellation is delivered. At the deadline, what is still
        unsettled is spooled if there is a spool, else reported to ``on_error`` as
        `ShutdownError`. A second asyncio cancellation brings the deadline forward to
        now: what is unsettled is spooled or reported at once.
        """
        if self._binding.state is not State.CLOSED:
            await self._binding.aclose(self._close_timeout(timeout))

    def close(self, timeout: float | None = None) -> None:
        """The blocking form of `aclose()`, for code that runs no event loop.

        Raises:
            BlockingCallError: called on the loop that runs the tracker.
        """
        if self._binding.state is not State.CLOSED:
            self._binding.close_blocking(self._close_timeout(timeout))

    def _close_timeout(self, timeout: float | None) -> float:
        return self._config.close_timeout if timeout is None else timeout
