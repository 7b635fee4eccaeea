"""What the flusher does during an outage, and with events too old to keep: hold the
queue, hand the prober a batch, spill the newest batches to the spool before memory runs
out, and drop what ``max_event_age`` says is too old. A mixin of `Flusher`."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from ._batch import Batch, Fate

if TYPE_CHECKING:
    from ._buffer import Buffer
    from ._config import Config
    from ._ledger import Ledger
    from ._sender import Sender


class Holding:
    """The outage half of `Flusher` (which sets these attributes)."""

    _config: Config
    _buffer: Buffer
    _ledger: Ledger
    sender: Sender
    room: asyncio.Event
    # (sequence number reached, loop time) at each tick, for max_event_age
    _marks: deque[tuple[int, float]]

    if TYPE_CHECKING:

        def _cut(self) -> Batch | None: ...

    async def _hold(self) -> None:
        """In an outage: cut nothing, but give the prober a batch if it has none, and
        spill the newest batches to the spool (if there is one) before memory runs out.
        A spool that cannot be written is set aside: memory and the byte budget take
        over, and what they cannot hold is dropped by reason."""
        sender, buffer, backlog = self.sender, self._buffer, self.sender.backlog
        if sender.wants_probe_batch and (batch := self._cut()) is not None:
            backlog.park(batch)
        ledger = self._ledger
        budget = self._config.max_buffer_bytes
        while (
            ledger.spool is not None
            and ledger.spool_writable
            and ledger.held_bytes + buffer.queued_bytes > budget // 2
        ):
            # memory is filling: write the newest batch held in memory to disk (the
            # oldest stays, to probe with), else cut one off the queue and write that
            held = [b for b in backlog.parked[1:] if b.spill_row is None]
            if held:
                batch = held[-1]
            elif buffer.queued > self._config.max_batch_size:
                cut = self._cut()
                if cut is None:
                    break
                backlog.park(batch := cut)
            else:
                break
            try:
                if not await self._spill(batch):
                    break  # the spool is full too: the overflow policy decides
            except Exception as exc:  # a full disk, an unwritable file
                self._spill_failed(exc)
                break
        self.room.set()
        buffer.open()

    def _spill_failed(self, exc: Exception) -> None:
        """A spill could not be written: storage's failure, not the flusher's."""
        self._ledger.spool_failed("write", exc)

    async def _spill(self, batch: Batch) -> bool:
        """Write ``batch`` to the spool and let go of it in memory; False if the spool
        has no room for it (``max_spool_bytes``)."""
        spool = self._ledger.spool
        assert spool is not None
        if batch.spool_id is not None:
            row = batch.spool_id  # read back from the spool whole: its row is there
        elif await spool.size() + len(batch.body) > self._config.max_spool_bytes:
            return False
        else:
            row = await spool.write(batch)
        self._ledger.spilled(batch, row)
        batch.events, batch.body = [], b""
        return True

    def _expire(self, cutoff: float) -> None:
        """Drop what was tracked before ``cutoff`` (loop time), counted as dropped for
        ``max_event_age``: from the queue, and batches waiting out an outage."""
        marks = self._marks
        while len(marks) >= 2 and marks[1][1] <= cutoff:
            marks.popleft()
        if not marks or marks[0][1] > cutoff:
            return
        old = marks[0][0]  # every event numbered below this was tracked before cutoff
        ledger, buffer = self._ledger, self._buffer
        dropped = 0
        ledger.moving()
        try:
            for _ in range(min(buffer.queued, old - ledger.taken)):
                try:
                    (buffer.staged or buffer.events).popleft()
                except IndexError:  # drop_oldest in another thread took the last one
                    break
                dropped += 1
            if dropped:
                ledger.drop(dropped, taken=True, reason="max_event_age")
        finally:
            ledger.moved()
        for batch in [b for b in self.sender.backlog.parked if b.root + b.n <= old]:
            ledger.settle(batch, Fate.DROPPED, reason="max_event_age")
