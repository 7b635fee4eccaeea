"""The backlog: the one owner of every batch from its cut to its settlement.

A batch enters the backlog when the ledger opens it (cut off the queue, or read back
from the spool) and leaves it when the ledger settles it; in between it is in exactly one
of three places, which its ``state`` names:

- ``ready``: waiting for a worker, oldest first (also what a torn-down loop left in
  flight, and what an outage parked, once the outage ends);
- ``waiting``: backing off after a retryable failure, until its retry is due; it holds
  no worker meanwhile, so batches that keep failing never keep the others waiting;
- ``sending``: in the hand of a worker or of the outage prober (a bisected batch is
  replaced by its halves here);
- ``parked``: waiting out an outage, oldest first; a parked batch may also be spilled
  (its events and body on disk only, ``spill_row`` set).

Workers, the prober, the flusher and the loop binding take batches from and return them
to the backlog; nothing else holds a batch. So the end of a run has one sweep
(`Backlog.sweep`), whatever state each batch was in. No I/O; it outlives event loops.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from collections.abc import Iterator

from ._batch import Batch

READY, WAITING, SENDING, PARKED = "ready", "waiting", "sending", "parked"


def _by_root(batch: Batch) -> int:
    return batch.root


class Backlog:
    """Cut batches not settled yet, by state (see the module docstring)."""

    def __init__(self) -> None:
        self.ready: deque[Batch] = deque()
        # min-heap of (when its retry is due, tie-breaker, batch)
        self.waiting: list[tuple[float, int, Batch]] = []
        self._order = itertools.count()
        self.sending: list[Batch] = []
        #: oldest first (by sequence number)
        self.parked: list[Batch] = []
        # the next parked batch to probe with: probes rotate, so that one batch the
        # server always fails (a poison batch) cannot hold an outage open
        self._probe_turn = 0

    def __len__(self) -> int:
        return len(self.ready) + len(self.waiting) + len(self.sending) + len(self.parked)

    def __iter__(self) -> Iterator[Batch]:
        yield from self.ready
        yield from (batch for _, _, batch in self.waiting)
        yield from self.sending
        yield from self.parked

    @property
    def next_due(self) -> float | None:
        """When the first waiting batch's retry is due, if one waits."""
        return self.waiting[0][0] if self.waiting else None

    @property
    def active(self) -> int:
        """Batches ready or being sent: each holds one of the sender's workers."""
        return len(self.ready) + len(self.sending)

    def add(self, batch: Batch) -> None:
        """A batch just opened: ready, after the others."""
        batch.state = READY
        self.ready.append(batch)

    def take(self, parked_first: bool, now: float) -> Batch | None:
        """The next batch for a worker (parked ones first if ``parked_first``, then a
        waiting one whose retry is due at ``now``, then a ready one), now ``sending``;
        None if there is none."""
        if parked_first and self.parked:
            batch = self.parked.pop(0)
        elif self.waiting and self.waiting[0][0] <= now:
            batch = heapq.heappop(self.waiting)[2]
        elif self.ready:
            batch = self.ready.popleft()
        else:
            return None
        batch.state = SENDING
        self.sending.append(batch)
        return batch

    def take_probe(self) -> Batch | None:
        """A parked batch to probe an outage with, each in turn (oldest first), now
        ``sending``; None if none is parked."""
        if not self.parked:
            return None
        index = self._probe_turn % len(self.parked)
        self._probe_turn = index + 1
        batch = self.parked.pop(index)
        batch.state = SENDING
        self.sending.append(batch)
        return batch

    def park(self, batch: Batch) -> None:
        """Hold ``batch`` (ready or sending) until an outage ends."""
        self._remove(batch)
        batch.state = PARKED
        bisect.insort(self.parked, batch, key=_by_root)

    def wait(self, batch: Batch, due: float) -> None:
        """``batch`` (sending) backs off until ``due``."""
        self._remove(batch)
        batch.state = WAITING
        heapq.heappush(self.waiting, (due, next(self._order), batch))

    def park_ready(self) -> int:
        """An outage began: park what is ready and what backs off (no worker sends it
        before the outage ends). How many were parked."""
        n = len(self.ready) + len(self.waiting)
        while self.ready:
            self.park(self.ready[0])
        while self.waiting:
            self.park(self.waiting[0][2])
        return n

    def replace(self, batch: Batch, halves: tuple[Batch, Batch]) -> None:
        """``batch`` (sending) was bisected: its halves take its place."""
        self._remove(batch)
        for half in halves:
            half.state = SENDING
            self.sending.append(half)

    def discard(self, batch: Batch) -> None:
        """``batch`` was settled (the ledger calls this)."""
        self._remove(batch)
        batch.state = ""

    def sweep(self) -> list[Batch]:
        """Take every batch out, oldest first: the end of a run (to give them up) or a
        torn-down loop (to re-queue them with `requeue`)."""
        batches = sorted(self, key=_by_root)
        self.ready.clear()
        self.waiting.clear()
        self.sending.clear()
        self.parked.clear()
        for batch in batches:
            batch.state = ""
        return batches

    def requeue(self) -> None:
        """A torn-down loop: every batch ready again, oldest first, for the next run (a
        new loop, a new clock: their retry time budget starts again)."""
        for batch in reversed(self.sweep()):
            batch.first_attempt = None
            batch.state = READY
            self.ready.appendleft(batch)

    def _remove(self, batch: Batch) -> None:
        state = batch.state
        if state == READY:
            self.ready.remove(batch)
        elif state == WAITING:
            index = next(i for i, entry in enumerate(self.waiting) if entry[2] is batch)
            self.waiting[index] = self.waiting[-1]
            self.waiting.pop()
            heapq.heapify(self.waiting)
        elif state == SENDING:
            self.sending.remove(batch)
        elif state == PARKED:
            self.parked.remove(batch)
