"""The flusher: cuts the buffer into batches and hands them to the sender, for one run
on one loop.

The loop binding makes a `Flusher` when the tracker starts on an event loop and runs
`Flusher.run` as that loop's background task. The flusher waits on ``wake`` with the
flush interval as timeout; ``track()`` sets ``wake`` only when a batch is full. Each
wake-up first hands over the batches waiting in the buffer (re-queued after a torn-down
loop), then cuts as many batches as the rule allows (full ones always; all that is queued
at the interval, on flush() and at close), each only once a sending slot is free, so
batches are as full as the backlog allows.

When the run ends, the flusher collects what is unsettled: at the close deadline it is
given up (spooled, else reported as `ShutdownError`); when the loop was torn down it goes
back to the buffer, as the same batches, for the next run.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable

import anyio
import anyio._backends._asyncio  # imported now, not by the loop thread: see below
import msgspec

from . import _batch
from ._batch import Batch, new_key
from ._buffer import Buffer
from ._config import Config
from ._event import Event
from ._exceptions import DeliveryError, EncodeError, ShutdownError
from ._health import Destination
from ._holding import Holding
from ._ledger import Ledger, close_deadline_error
from ._sender import RESTART_DELAY, RESTART_MAX_DELAY, Sender
from ._spool import SpooledBatch
from ._transport import BatchTransport

logger = logging.getLogger("lehnz_async")
# anyio imports its backend at the first task group. Were the tracker's loop thread to do
# that while the process forks (gunicorn --preload), the child would inherit the module's
# import lock held by a thread it does not have, and its loop thread would block forever.

_spool_decoder = msgspec.json.Decoder(list[Event])
_UNSENT = "the tracker closed before these events were sent"
_NOT_PREPARED = (
    "the close deadline passed before before_send ran on these events; they were not sent"
)


class Flusher(Holding):
    """Sends a tracker's buffer, one run on one event loop.

    Args:
        config: The tracker's options.
        buffer: The tracker's buffer.
        ledger: The tracker's ledger.
        transport: Where batches go.
        rng: Backoff jitter.
        replay_spool: Whether this run first re-sends what the spool holds.
        destination: The endpoint's health (outages, the body size learnt from 413).
        clock: Reads the close deadline between before_send calls (`_seams`).
    """

    def __init__(
        self,
        config: Config,
        buffer: Buffer,
        ledger: Ledger,
        transport: BatchTransport,
        rng: random.Random,
        replay_spool: bool,
        destination: Destination,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._clock = clock
        self._buffer = buffer
        self._ledger = ledger
        self._transport = transport
        self._replay_spool = replay_spool and ledger.spool is not None
        self.sender = Sender(
            transport,
            ledger,
            config.retry,
            config.max_concurrent_requests,
            rng,
            destination,
            ledger.endpoint,
        )
        # (sequence number reached, loop time) at each tick, for max_event_age
        self._marks: deque[tuple[int, float]] = deque()
        #: set by track() when a batch is full, and by flush() and close()
        self.wake = asyncio.Event()
        #: set whenever batches leave the queue (atrack() waits on it)
        self.room = asyncio.Event()
        #: set when run() has finished, whichever way
        self.done = asyncio.Event()
        #: set by close(): drain everything, then stop
        self.closing = False
        #: after run(): whether it ended without close() (the loop was torn down); its
        #: unsettled batches are back in the buffer
        self.orphaned = False
        self._drain_requested = False
        self._deadline: anyio.CancelScope | None = None
        # cancelled when the close deadline passes (made in run(): anyio before 4.1
        # cannot make one outside a task)
        self._stop: anyio.CancelScope | None = None
        # set once the close deadline passed: before_send is not called any more
        self._past_deadline = False
        #: clock() of the close deadline, set when close is called (read
        #: between hook calls: a hook that blocks the loop keeps timers from firing)
        self.deadline_at = float("inf")
        # (events, kept so far, index) while before_send runs over a cut; see
        # abandon_hooked
        self._hooked: tuple[list[Event], list[Event], int] | None = None
        self._abandoned = False

    @property
    def in_hook(self) -> bool:
        """Whether ``before_send`` is running now (for the watchdog)."""
        return self._hooked is not None

    # -- what the loop binding calls ------------------------------------------------------

    async def run(self) -> None:
        """The background task: send until closed (or cancelled by the loop's teardown)."""
        try:
            # close() stops the run through this scope, not Task.cancel(): a scope's
            # cancellation is level-triggered, delivered again at every await inside it,
            # where a task's is delivered once, and an anyio scope whose own deadline
            # passes at the same moment may swallow it (anyio before 4.16 did, and a
            # close that passed its deadline then waited for ever)
            self._stop = stop = anyio.CancelScope()
            self._buffer.freezing = False  # one scheduled on a torn-down loop never ran
            if self._past_deadline:  # the close deadline passed before this task began
                stop.cancel()
            with stop:
                await self._transport.open()
                rows = await self._load_spool()
                async with anyio.create_task_group() as tg:
                    self.sender.bind(tg.start_soon)
                    await self._replay(rows)
                    await self._supervise()
                    self.sender.stop()
        except Exception as exc:  # a bug outside the supervised loop: settle, never strand
            self._ledger.internal_error("flusher's run", exc)
            self.closing = True
        finally:
            self.orphaned = not self.closing
            self.sender.close_unstarted()
            with anyio.CancelScope(shield=True):
                self._settle_leftovers()
                await self._ledger.commit_spool()
                await self._transport.close()
            self._ledger.release_waiters(all_=True)
            self.done.set()

    async def _load_spool(self) -> list[SpooledBatch]:
        """What an earlier tracker spooled, read before anything of this run can be
        written there; a spool that cannot be opened or read is set aside, and the
        tracker runs on without one (a storage failure stays the storage's)."""
        spool = self._ledger.spool
        if spool is None or not self._replay_spool:
            return []
        try:
            return await spool.load()
        except Exception as exc:
            self._ledger.spool_failed("read", exc)
            return []

    async def _supervise(self) -> None:
        """Run the flush loop; a bug in it is counted, logged once, and the loop starts
        again after a backoff (doubling to a cap), the way a supervisor restarts a child:
        the batches it cut are in the backlog, and the workers keep sending them."""
        delay = RESTART_DELAY
        while True:
            try:
                await self._flush_loop()
                return
            except Exception as exc:
                self._ledger.internal_error("flusher", exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX_DELAY)

    async def flush(self) -> None:
        """Return once every event queued before the call is settled."""
        target = self._ledger.taken + self._buffer.queued
        if self._ledger.settled_before(target):
            return
        self._drain_requested = True
        self.wake.set()
        await self._ledger.wait_settled(target)

    async def wait_for_room(self) -> None:
        """Return once the queue is below its bound, ``max_queue_size`` or what the byte
        budget allows (or the flusher stops)."""
        buffer = self._buffer
        while buffer.queued >= buffer.limit() and not self.closing and not self.done.is_set():
            self.room.clear()
            self.wake.set()
            # room comes when batches are cut or settled; look again at least each tick
            with anyio.move_on_after(self._config.flush_interval):
                await self.room.wait()

    async def close(self, deadline: float) -> None:
        """Drain and stop; at ``deadline`` seconds (or on `hurry`), give up what is
        unsettled."""
        self.closing = True
        self.wake.set()
        self.deadline_at = min(self.deadline_at, self._clock() + deadline)
        with anyio.move_on_after(deadline) as self._deadline:
            await self.done.wait()
        if not self.done.is_set():
            self._past_deadline = True
            logger.warning(
                "close deadline of %.1f s passed with %d event(s) unsettled",
                deadline,
                self._ledger.in_flight + self._buffer.queued,
            )
            if self._stop is not None:
                self._stop.cancel()
            # else run() has not begun: it sees _past_deadline and stops at once
            await self.done.wait()

    def hurry(self) -> None:
        """Bring the close deadline forward to now (a second cancellation of aclose())."""
        self._past_deadline = True
        if self._deadline is not None:
            self._deadline.cancel()

    # -- cutting and handing over ---------------------------------------------------------

    async def _flush_loop(self) -> None:
        config, buffer, sender = self._config, self._buffer, self.sender
        backlog = sender.backlog
        destination = sender.destination
        loop = asyncio.get_running_loop()
        interval = config.flush_interval
        next_tick = loop.time() + interval
        while True:
            # in an outage, and while parked batches drain after one, look every 0.1 s
            poll = destination.outage or bool(backlog.parked)
            idle = buffer.queued < config.max_batch_size and not self._drain_requested
            if poll or (idle and not self.closing):
                timeout = next_tick - loop.time()
                with anyio.move_on_after(min(timeout, 0.1) if poll else timeout):
                    await self.wake.wait()
            self.wake.clear()
            now = loop.time()
            drain = self._drain_requested or self.closing
            if now >= next_tick:
                drain = True
                next_tick = now + interval
                if config.max_event_age is not None:  # marks only when they are used
                    self._marks.append((self._ledger.taken + buffer.queued, now))
                    self._expire(now - config.max_event_age)
            if destination.outage:
                await self._hold()
                continue
            self._drain_requested = False
            while buffer.queued and (drain or buffer.queued >= config.max_batch_size):
                if not sender.has_free_worker:  # cut only when a worker is free: fuller batches
                    await self._free_worker()
                if destination.outage:
                    break
                if self._cut() is None:
                    continue
                self.room.set()
                sender.wake()
            self._ledger.release_waiters(all_=False)  # if only unencodable events were taken
            if not self.closing:
                buffer.open()
            elif not buffer.queued and not backlog.parked:
                return  # closing and drained; the workers finish what is in the backlog

    async def _free_worker(self) -> None:
        sender = self.sender
        while not sender.has_free_worker and not sender.destination.outage:
            sender.freed.clear()
            await sender.freed.wait()

    def _cut(self) -> Batch | None:
        """Cut the next batch off the queue and open it in the ledger; None once the
        queue is empty. Events that cannot be encoded are reported here."""
        config, ledger = self._config, self._ledger
        max_bytes = config.max_batch_bytes
        learnt = self.sender.destination.body_limit
        if learnt is not None:
            max_bytes = min(max_bytes, learnt)
        buffer = self._buffer
        ledger.moving()  # what leaves the queue is counted in the ledger before moved()
        try:
            while cut := _batch.cut(
                buffer.events,
                config.max_batch_size,
                max_bytes,
                buffer.staged,
                self._prepare,
                self._window_room(),
            ):
                for event, reason in cut.unencodable:
                    ledger.fail_taken(
                        [event], EncodeError(f"the event cannot be sent as JSON: {reason}", [event])
                    )
                if cut.events:
                    batch = Batch(cut.events, cut.body, new_key(), -1)
                    ledger.open(batch)  # in the backlog from now until it is settled
                    self._buffer.observe(len(cut.body), len(cut.events))
                    return batch
            return None
        finally:
            ledger.moved()

    def freeze(self) -> None:
        """A call on the loop (`Buffer.freeze`): freeze what waits, unless a full batch
        is about to be cut by a free worker anyway, or an outage or the close holds the
        queue. (While every worker is busy, events pile up past a batch: frozen too.)"""
        buffer = self._buffer
        buffer.freezing = False
        if (
            self.closing
            or self.done.is_set()
            or self._drain_requested
            or self.sender.destination.outage
            or (buffer.queued >= self._config.max_batch_size and self.sender.has_free_worker)
        ):
            return  # (a full batch with a worker free to take it is cut at once)
        try:
            buffer.freeze_waiting()
        except Exception as exc:  # a bug: the events stay where they are, unfrozen
            self._ledger.internal_error("freezer", exc)
        if buffer.threshold:  # re-armed: the next freeze when as many wait again (a
            buffer.open()  # threshold of 0, no flusher or no room, stays as it is)

    def _window_room(self) -> int | None:
        """Most events the next batch may take off the queue before a window of
        `Tracker.mark` ends (None: no window ends ahead)."""
        return self._ledger.window_room() if self._ledger.windows.pending else None

    def _prepare(self, events: list[Event]) -> list[Event]:
        """Run ``before_send`` over events leaving the queue: what it returns is sent;
        None drops the event (counted, reason ``before_send``); if it raises, or returns
        something that is not an `Event`, the event is not sent and is reported to
        on_error with the exception as the cause (so no unscrubbed event goes out)."""
        hook, ledger = self._config.before_send, self._ledger
        if hook is None:
            return events
        kept: list[Event] = []
        started = time.perf_counter()
        for index, event in enumerate(events):
            self._hooked = (events, kept, index)  # for abandon_hooked()
            if self._past_deadline or self._clock() >= self.deadline_at:
                self._past_deadline = True  # a hook that blocks cannot stretch the deadline
                left = events[index:]
                ledger.fail_taken(left, ShutdownError(_NOT_PREPARED, left))
                break
            try:
                out = hook(event)
                if self._abandoned:  # reported at exit while the hook ran
                    return []
                if out is not None and out.__class__ is not Event:
                    raise TypeError(f"it returned a {type(out).__name__}, not an Event or None")
            except Exception as exc:
                error = DeliveryError(
                    f"before_send raised {type(exc).__name__}: {exc}; the event is not sent",
                    [event],
                )
                error.__cause__ = exc
                ledger.fail_taken([event], error)
                continue
            if out is None:
                ledger.drop(1, taken=True, reason="before_send")
            else:
                kept.append(out)
        self._hooked = None
        if events:
            ledger.slow_hook("before_send", (time.perf_counter() - started) / len(events))
        return kept

    def abandon_hooked(self) -> list[Event]:
        """At exit, with the loop stuck (in a hook that blocks, say): the events taken
        off the queue that ``before_send`` is going through, to be reported; the flusher
        does not account for them again if the hook ever returns."""
        self._abandoned = True
        hooked, self._hooked = self._hooked, None
        if hooked is None:
            return []
        events, kept, index = hooked
        return kept + events[index:]

    async def _replay(self, rows: list[SpooledBatch]) -> None:
        """Hand over what an earlier tracker spooled, oldest first, with its keys."""
        if rows:
            logger.info("re-sending %d spooled batch(es) from %s", len(rows), self._ledger.spool)
        for row in rows:
            try:
                events = _spool_decoder.decode(row.body)
            except Exception as exc:
                logger.error(
                    "dropping unreadable spool row %d (%d events): %s", row.id, row.events, exc
                )
                self._ledger.drop(
                    row.events, taken=False, reason="unreadable_spool_row", replayed=True
                )
                self._ledger.spool.remove(row.id)  # type: ignore[union-attr]
                continue
            await self._free_worker()
            batch = Batch(events, row.body, row.idempotency_key, -1, row.id)
            self._ledger.open(batch, spool_id=row.id)
            self.sender.wake()

    # -- the end of a run -----------------------------------------------------------------

    def _settle_leftovers(self) -> None:
        """Give up (close deadline) or re-queue (torn-down loop) what is unsettled: the
        backlog's batches, whatever their state, and what is still queued."""
        ledger, buffer, backlog = self._ledger, self._buffer, self.sender.backlog
        if self.orphaned:
            backlog.requeue()
            return
        destination = self.sender.destination
        outage = destination.cause if destination.outage else ""
        for left in backlog.sweep():
            ledger.give_up(left, close_deadline_error(left, outage))
        if not buffer.queued:
            return
        unsent = f"{_UNSENT}; the endpoint was down: {outage}" if outage else _UNSENT
        unscrubbed = self._past_deadline and self._config.before_send is not None
        if ledger.spool is None or not ledger.spool_writable or unscrubbed:
            # unsent events are not run through before_send once the deadline has passed
            # (so no unscrubbed event is spooled): they are reported
            ledger.moving()
            leftover_events = list(buffer.staged) + list(buffer.events)
            buffer.staged.clear()
            buffer.events.clear()
            ledger.fail_taken(leftover_events, ShutdownError(unsent, leftover_events))
            ledger.moved()
            return
        while (cut := self._cut()) is not None:
            ledger.give_up(cut, ShutdownError(unsent, cut.events))
