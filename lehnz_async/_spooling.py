"""The ledger's dealings with the spool: spilling during an outage, reading back,
committing, and setting a spool aside when the storage fails (a failure of the storage
stays the storage's: the tracker runs on without it). A mixin of `Ledger`."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from ._batch import Fate, memory_size
from ._event import decode_events
from ._exceptions import DeliveryError
from ._spool import SpoolWriteError

if TYPE_CHECKING:
    from ._batch import Batch
    from ._marks import Windows
    from ._spool import Spool

logger = logging.getLogger("lehnz_async")


class Spooling:
    """The spool's half of `Ledger` (which sets these attributes)."""

    _lock: threading.Lock
    spool: Spool | None
    spool_writable: bool
    spool_error: str
    held_bytes: int
    spooled: int
    failed: int
    windows: Windows
    _spooled_reasons: list[tuple[int, str]]
    _spool_logged: bool

    if TYPE_CHECKING:  # the other halves' methods it calls

        def report(self, error: DeliveryError) -> None: ...
        def settle(self, batch: Batch, fate: Fate, error: DeliveryError | None = None) -> None: ...
        def _release_waiters(self) -> None: ...

    def spilled(self, batch: Batch, row_id: int) -> None:
        """``batch`` was written to the spool during an outage and let go of in memory;
        it is still in flight, and its row goes when it is settled."""
        with self._lock:
            self.held_bytes -= batch.mem
            batch.mem = 0
            batch.spill_row = row_id

    def unspill(self, batch: Batch) -> None:
        """A batch read back from its spill row is being split: the halves are in memory
        only, and the row goes."""
        if batch.spill_row is not None and self.spool is not None:
            self.spool.remove(batch.spill_row)
            batch.spill_row = None

    async def commit_spool(self) -> None:
        """Write what was spooled since the last commit. Batches that cannot be written
        (a full disk, an unwritable path) are failed and reported instead, and the spool
        is set aside (`spool_failed`)."""
        spool = self.spool
        if spool is None or not spool.dirty:
            return
        reasons, self._spooled_reasons = self._spooled_reasons, []
        try:
            await spool.commit()
        except SpoolWriteError as exc:
            events = [event for batch in exc.batches for event in batch.events]
            if events:
                with self._lock:
                    self.spooled -= len(events)
                    self.failed += len(events)
                    self.windows.unspool(exc.batches)
                error = DeliveryError(f"could not write the spool {spool.path}: {exc}", events)
                error.__cause__ = exc.__cause__
                self.report(error)
            self.spool_failed("write", exc)
            self._release_waiters()
            return
        self._release_waiters()
        for n, why in reasons:  # said only once they are on disk
            logger.log(
                logging.DEBUG if self._spool_logged else logging.WARNING,
                "%d event(s) spooled to %s (%s); they are re-sent when a tracker next starts",
                n,
                spool.path,
                why,
            )
            self._spool_logged = True

    def unreadable_spill(self, batch: Batch, exc: BaseException) -> None:
        """A batch spilled during an outage could not be read back: its row stays in the
        spool (spooled, re-sent when a tracker next starts), and the failure is logged."""
        logger.error(
            "could not read back %d spilled event(s) from the spool (%s: %s); they stay "
            "there and are re-sent when a tracker next starts",
            batch.n,
            type(exc).__name__,
            exc,
        )
        self.settle(batch, Fate.SPOOLED)

    def spool_failed(self, doing: str, exc: BaseException) -> None:
        """The spool could not be opened, read or written: the tracker runs on without
        writing to it (what could not be written is already reported). A file that could
        not be read is let go of and moved aside (``<path>.unusable-<time>``), never
        deleted, so that whatever it held is kept for a person to look at; one that could
        not be written (a full disk) is still read back. Logged once at ERROR, and in
        `stats`."""
        spool = self.spool
        if spool is None or (doing == "write" and not self.spool_writable):
            return
        self.spool_writable = False
        where = ""
        if doing != "write":
            self.spool = None
            aside = spool.set_aside()
            where = f"; moved aside to {aside}" if aside else ""
        self.spool_error = f"could not {doing} the spool {spool.path}: {exc}{where}"
        logger.error("%s; running on without writing to a spool", self.spool_error)

    async def restore(self, batch: Batch) -> None:
        """Read a batch spilled during an outage back from the spool, to send it.

        Raises:
            LookupError: its row is gone, or the spool with it.
        """
        spool = self.spool
        if spool is None or batch.spill_row is None:
            raise LookupError(f"the spool holding {batch!r} was set aside")
        body = await spool.read(batch.spill_row)
        if body is None:
            raise LookupError(f"spool row {batch.spill_row} of {batch!r} is gone")
        batch.events, batch.body = decode_events(body), body
        with self._lock:
            batch.mem = memory_size(len(batch.body), batch.n)
            self.held_bytes += batch.mem
