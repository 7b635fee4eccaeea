"""The flusher: cuts the queue into batches and sends them, for one run on one loop.

A `Tracker` makes a `Flusher` when it starts on an event loop and runs `Flusher.run` as
that loop's background task. The flusher waits on ``wake`` with the flush interval as
timeout; ``track()`` sets ``wake`` only when a batch is full. Each wake-up cuts as many
batches as the rule allows (full ones always; all that is queued at the interval, on
flush() and at close), each only once a sending slot is free, so batches are as full as
the backlog allows. Every event taken from the queue is in ``unsettled`` until its
delivery settles it in the ledger, so that `flush()` knows what it waits for and a
torn-down loop can hand back what it had in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import anyio
import anyio.abc
import anyio.to_thread
import msgspec

from . import _batch
from ._config import Config
from ._event import Event
from ._exceptions import DeliveryError, EncodeError, ShutdownError
from ._sender import Sender, new_idempotency_key
from ._spool import Spool, SpooledBatch
from ._stats import Ledger
from ._transport import BatchTransport

logger = logging.getLogger("lehnz_async")

_spool_decoder = msgspec.json.Decoder(list[Event])
_UNSENT = "the tracker closed before these events were sent"


class _Batch(NamedTuple):
    """A batch handed to a worker."""

    events: list[Event]
    body: bytes
    #: its Idempotency-Key, the same on every retry and re-send from the spool
    key: str
    #: the spool row it was re-sent from, if any
    spool_id: int | None


class Flusher:
    """Sends a tracker's queue, one run on one event loop.

    Args:
        config: The tracker's options.
        queue: The tracker's queue (events are appended by track(), from any thread).
        ledger: The tracker's counters.
        transport: Where batches go.
        spool: Where undeliverable batches go, if anywhere.
        replay_spool: Whether this run re-sends what the spool holds first.
        report: The tracker's failure reporter (counts, logs, calls on_error).
        reopen: Called after each drain while running, so track() may wake us again.
    """

    def __init__(
        self,
        config: Config,
        queue: deque[Event],
        ledger: Ledger,
        transport: BatchTransport,
        spool: Spool | None,
        replay_spool: bool,
        report: Callable[[DeliveryError], None],
        reopen: Callable[[], None],
    ) -> None:
        self._config = config
        self._queue = queue
        self._ledger = ledger
        self._transport = transport
        self._spool = spool
        self._replay_spool = replay_spool and spool is not None
        self._report = report
        self._reopen = reopen
        self._sender = Sender(
            transport,
            ledger,
            report,
            self._give_up,
            max_attempts=config.max_attempts,
            max_retry_time=config.max_retry_time,
            retry_base_delay=config.retry_base_delay,
            retry_max_delay=config.retry_max_delay,
        )
        #: set by track() when a batch is full, and by flush() and close()
        self.wake = asyncio.Event()
        #: set whenever batches leave the queue (atrack() waits on it)
        self.room = asyncio.Event()
        #: set when run() has finished, whichever way
        self.done = asyncio.Event()
        #: set by close(): drain everything, then stop
        self.closing = False
        #: after run(): whether the loop stopped it without close() (its events are back
        #: in the queue)
        self.orphaned = False
        self._drain_requested = False
        # sequence number of each batch's first event -> the batch, until settled
        self._unsettled: dict[int, _Batch] = {}
        # batches handed to the workers, (sequence number, batch); None tells one to stop
        self._outbox: asyncio.Queue[tuple[int, _Batch] | None] = asyncio.Queue()
        self._workers = 0  # sender tasks started so far
        self._start_worker: Callable[[], object] = lambda: None  # set in run()
        self._replayed = asyncio.Event()  # the spool replay has handed everything over
        self._replayed.set()
        # (sequence number, future): flush() calls waiting for all below it to settle
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # spool rows to add (key, n events, body) and to remove (ids), not yet committed
        self._spool_add: list[tuple[str, int, bytes]] = []
        self._spool_remove: list[int] = []
        self._spool_logged = False

    # -- what the tracker calls -----------------------------------------------------------

    async def run(self) -> None:
        """The background task: send until closed (or cancelled by the loop's teardown).

        Up to ``max_concurrent_requests`` sender tasks, started as the first batches are
        handed over, live as long as the run and take batches from ``_outbox``; the flush
        loop cuts a batch only once one of them is free.
        """
        slots = asyncio.Semaphore(self._config.max_concurrent_requests)
        try:
            await self._transport.open()
            # read the spool before anything of this run can be written to it
            spooled = await self._load_spool() if self._replay_spool else []
            async with anyio.create_task_group() as tg:
                self._start_worker = partial(tg.start_soon, self._worker, slots)
                if spooled:
                    await tg.start(self._replay, slots, spooled)
                await self._flush_loop(slots)
                await self._replayed.wait()
                for _ in range(self._workers):
                    self._outbox.put_nowait(None)  # each worker stops after what it has
        finally:
            # Cancelled without close(): the loop is being torn down. Deliveries that were
            # cancelled put their events back already (_give_up); put back those whose
            # delivery never started too, for the exit hook or a later loop to send.
            # Cancelled at the close deadline: give those up (spool or report).
            self.orphaned = not self.closing
            with anyio.CancelScope(shield=True):
                if self.orphaned:
                    self.requeue_unsettled()
                else:
                    self._give_up_unsettled()
                    self._settle_leftovers()
                await self._commit_spool()
                await self._transport.close()
            self._release_flush_waiters(all_=True)
            self.done.set()

    async def flush(self) -> None:
        """Return once every event queued before the call is settled."""
        target = self._ledger.taken + len(self._queue)
        if self._settled_before(target):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, future))
        self._drain_requested = True
        self.wake.set()
        await future

    async def wait_for_room(self) -> None:
        """Return once the queue is below ``max_queue_size`` (or the flusher stops)."""
        limit = self._config.max_queue_size
        while len(self._queue) >= limit and not self.closing and not self.done.is_set():
            self.room.clear()
            self.wake.set()
            await self.room.wait()

    async def close(self, deadline: float, task: asyncio.Task[None]) -> None:
        """Drain and stop; at ``deadline`` seconds, cancel what is unsettled."""
        self.closing = True
        self.wake.set()
        with anyio.move_on_after(deadline):
            await self.done.wait()
        if not self.done.is_set():
            logger.warning(
                "close deadline of %.1f s passed with %d event(s) unsettled",
                deadline,
                self._ledger.in_flight + len(self._queue),
            )
            task.cancel()
            await self.done.wait()

    def requeue_unsettled(self) -> None:
        """Put every unsettled batch back at the front of the queue, in order.

        At-least-once: a batch whose answer was lost with its loop may be sent twice.
        """
        for _, batch in sorted(self._unsettled.items(), reverse=True):
            self._queue.extendleft(reversed(batch.events))
            self._ledger.taken -= len(batch.events)
            self._ledger.in_flight -= len(batch.events)
        self._unsettled.clear()

    def _give_up_unsettled(self) -> None:
        """At the close deadline: batches no sender had started on are given up too."""
        for batch in self._unsettled.values():
            self._give_up(ShutdownError(_UNSENT, batch.events), batch.body, batch.key)
            if batch.spool_id is not None:
                self._spool_remove.append(batch.spool_id)
        self._unsettled.clear()

    # -- cutting and sending ------------------------------------------------------------

    async def _flush_loop(self, slots: asyncio.Semaphore) -> None:
        config = self._config
        queue = self._queue
        interval = config.flush_interval
        next_tick = time.monotonic() + interval
        while True:
            idle = len(queue) < config.max_batch_size and not self._drain_requested
            if idle and not self.closing:
                with anyio.move_on_after(next_tick - time.monotonic()):
                    await self.wake.wait()
            self.wake.clear()
            now = time.monotonic()
            drain = self._drain_requested or self.closing
            if now >= next_tick:
                drain = True
                next_tick = now + interval
            self._drain_requested = False
            while queue and (drain or len(queue) >= config.max_batch_size):
                await slots.acquire()  # cut only when a slot is free: fuller batches
                cut = self._take_batch()
                if cut is None:
                    slots.release()
                    continue
                self.room.set()
                self._hand_over(cut.events, cut.body, new_idempotency_key())
            self._release_flush_waiters()  # in case only unencodable events were taken
            if not self.closing:
                self._reopen()
            elif not queue:
                return  # closing and drained; the workers finish what is handed over

    def _take_batch(self) -> _batch.Cut | None:
        """Cut the next batch off the queue into the ledger; None once the queue is empty.

        Events that cannot be encoded are reported here; the batch returned is not empty.
        """
        config = self._config
        ledger = self._ledger
        while cut := _batch.cut(self._queue, config.max_batch_size, config.max_batch_bytes):
            ledger.taken += len(cut.events) + len(cut.unencodable)
            ledger.in_flight += len(cut.events)
            for event, reason in cut.unencodable:
                self._report(EncodeError(f"the event could not be encoded: {reason}", [event]))
            if cut.events:
                return cut
        return None

    def _hand_over(
        self, events: list[Event], body: bytes, key: str, spool_id: int | None = None
    ) -> None:
        """Give a worker a batch already counted as taken and in flight, in a held slot."""
        seq = self._ledger.taken - len(events)
        self._ledger.batches += 1
        batch = _Batch(events, body, key, spool_id)
        self._unsettled[seq] = batch
        self._outbox.put_nowait((seq, batch))
        if self._workers < self._config.max_concurrent_requests:
            # lazily: a run torn down before its first batch leaves no task unstarted
            self._workers += 1
            self._start_worker()

    async def _worker(self, slots: asyncio.Semaphore) -> None:
        """Deliver batches from the outbox, one at a time, until handed None."""
        while (item := await self._outbox.get()) is not None:
            seq, batch = item
            try:
                await self._sender.deliver(batch.events, batch.body, batch.key)
            finally:
                slots.release()
                del self._unsettled[seq]
                if batch.spool_id is not None:  # settled, or spooled anew under a new row
                    self._spool_remove.append(batch.spool_id)
                self._release_flush_waiters()
            await self._commit_spool()

    def _settle_leftovers(self) -> None:
        """Spool or report what is still queued (the close deadline passed first)."""
        if not self._queue:
            return
        if self._spool is None:
            leftovers = list(self._queue)
            self._queue.clear()
            self._ledger.discarded += len(leftovers)
            self._report(ShutdownError(_UNSENT, leftovers))
            return
        while (cut := self._take_batch()) is not None:
            self._give_up(ShutdownError(_UNSENT, cut.events), cut.body, new_idempotency_key())

    # -- flush() bookkeeping -------------------------------------------------------------

    def _settled_before(self, target: int) -> bool:
        """Whether every event with a sequence number below ``target`` is settled."""
        return self._ledger.taken >= target and all(seq >= target for seq in self._unsettled)

    def _release_flush_waiters(self, all_: bool = False) -> None:
        waiting = []
        for target, future in self._flush_waiters:
            if all_ or self._settled_before(target):
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((target, future))
        self._flush_waiters = waiting

    # -- the spool ------------------------------------------------------------------------

    def _give_up(self, error: DeliveryError, body: bytes, key: str) -> None:
        """Events out of time: spool them if there is a spool, else report them failed."""
        n = len(error.events)
        self._ledger.in_flight -= n
        if isinstance(error, ShutdownError) and not self.closing:
            # cancelled by the loop's teardown, not by the close deadline: keep them
            self._ledger.taken -= n
            self._queue.extendleft(reversed(error.events))
            return
        if self._spool is None:
            self._report(error)
            return
        self._ledger.spooled += n
        self._spool_add.append((key, n, body))
        logger.log(
            logging.DEBUG if self._spool_logged else logging.WARNING,
            "%d event(s) spooled to %s (%s); they are re-sent when a tracker next starts",
            n,
            self._spool.path,
            error,
        )
        self._spool_logged = True

    async def _commit_spool(self) -> None:
        if self._spool is None or not (self._spool_add or self._spool_remove):
            return
        add, self._spool_add = self._spool_add, []
        remove, self._spool_remove = self._spool_remove, []
        await anyio.to_thread.run_sync(self._spool.commit, add, remove)

    async def _load_spool(self) -> list[SpooledBatch]:
        assert self._spool is not None
        rows = await anyio.to_thread.run_sync(self._spool.load)
        if rows:
            logger.info("re-sending %d spooled batch(es) from %s", len(rows), self._spool.path)
        return rows

    async def _replay(
        self,
        slots: asyncio.Semaphore,
        rows: list[SpooledBatch],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Re-send what an earlier tracker spooled, oldest first, then delete it."""
        self._replayed.clear()
        task_status.started()
        try:
            await self._replay_rows(slots, rows)
        finally:
            self._replayed.set()

    async def _replay_rows(self, slots: asyncio.Semaphore, rows: list[SpooledBatch]) -> None:
        for row in rows:
            try:
                events = _spool_decoder.decode(row.body)
            except msgspec.DecodeError as exc:
                logger.error("dropping unreadable spool row %d: %s", row.id, exc)
                self._spool_remove.append(row.id)
                continue
            await slots.acquire()
            self._ledger.taken += len(events)
            self._ledger.in_flight += len(events)
            self._hand_over(events, row.body, row.idempotency_key, row.id)
