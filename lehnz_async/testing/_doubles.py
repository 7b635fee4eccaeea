"""Stand-ins for the engine's seams (see ``lehnz_async._seams``), for tests that drive
the real engine on virtual time, as the deterministic simulation does.

- `MemorySpool`: the spool kept in a list, its writes made inline (the SQLite spool
  writes in a worker thread, which would let real time into virtual time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .._spool import Spool, SpooledBatch

_T = TypeVar("_T")


class MemorySpool(Spool):
    """A spool kept in a list, written inline, on the loop.

    ``rows`` outlives the tracker, so a later tracker given the same object re-sends
    them, as one given the same ``spool_path`` would. Subclass it to make a disk fail
    (override ``_write``, ``_commit`` or ``_read`` to raise ``OSError``).
    """

    def __init__(self) -> None:
        super().__init__("<memory>")
        #: The spooled batches, oldest first.
        self.rows: list[SpooledBatch] = []
        self._next_id = 1

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        return fn(*args)

    def _load(self) -> list[SpooledBatch]:
        return list(self.rows)

    def _write(self, key: str, n: int, body: bytes) -> int:
        self.rows.append(SpooledBatch(self._next_id, key, n, body))
        self._next_id += 1
        return self._next_id - 1

    def _read(self, row_id: int) -> bytes | None:
        return next((row.body for row in self.rows if row.id == row_id), None)

    def _size(self) -> int:
        return sum(len(row.body) for row in self.rows)

    def _commit(self, add: list[tuple[str, int, bytes]], remove: list[int]) -> None:
        gone = set(remove)
        self.rows = [row for row in self.rows if row.id not in gone]
        for key, n, body in add:
            self.rows.append(SpooledBatch(self._next_id, key, n, body))
            self._next_id += 1
