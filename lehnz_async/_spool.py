"""The durable spool: batches that could not be delivered in time, in a SQLite file.

One row per batch, holding its exact JSON body and its Idempotency-Key, so that a batch
re-sent from the spool is byte-for-byte the one that may already have reached the server
and a de-duplicating server keeps it once. Rows to add and to remove are buffered by the
ledger as batches settle (`add`, `remove`, on the loop, no I/O) and written in one
transaction by `commit`, off the loop (``anyio.to_thread``). Each write opens its own
connection, so any worker thread may make it.

One spool file belongs to one process at a time: two live trackers sharing a file would
both re-send its rows (de-duplicated by the server through the Idempotency-Key, but sent
twice).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import anyio.to_thread

if TYPE_CHECKING:
    import sqlite3

    from ._batch import Batch

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    idempotency_key TEXT NOT NULL,
    events INTEGER NOT NULL,
    body BLOB NOT NULL
)
"""


class SpoolWriteError(Exception):
    """A commit failed; ``batches`` were not written."""

    def __init__(self, batches: list[Batch], cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.batches = batches


class SpooledBatch(NamedTuple):
    """One spooled batch, as stored."""

    id: int
    idempotency_key: str
    events: int
    body: bytes


class Spool:
    """A SQLite file of undelivered batches, oldest first.

    Args:
        path: The file; created with its parent folder if missing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._add: list[Batch] = []
        self._remove: list[int] = []

    # -- buffered on the loop, by the ledger ----------------------------------------------

    def add(self, batch: Batch) -> None:
        """Write ``batch`` at the next `commit`."""
        self._add.append(batch)

    def remove(self, row_id: int) -> None:
        """Delete row ``row_id`` at the next `commit`."""
        self._remove.append(row_id)

    @property
    def dirty(self) -> bool:
        return bool(self._add or self._remove)

    async def commit(self) -> None:
        """Write what was added and removed since the last commit, in one transaction.

        Raises:
            SpoolWriteError: nothing was written; it holds the batches that were not.
        """
        if not self.dirty:
            return
        add, self._add = self._add, []
        remove, self._remove = self._remove, []
        rows = [(batch.key, len(batch.events), batch.body) for batch in add]
        try:
            await self._run(self._commit, rows, remove)
        except Exception as exc:
            raise SpoolWriteError(add, exc) from exc

    async def load(self) -> list[SpooledBatch]:
        """Every spooled batch, oldest first."""
        return await self._run(self._load)

    async def write(self, batch: Batch) -> int:
        """Write ``batch`` now (spilling it during an outage); its row id."""
        return await self._run(self._write, batch.key, batch.n, batch.body)

    async def read(self, row_id: int) -> bytes | None:
        """The body of row ``row_id``, or None if it is gone."""
        return await self._run(self._read, row_id)

    async def size(self) -> int:
        """Bytes of bodies the spool holds."""
        return await self._run(self._size)

    def set_aside(self) -> str | None:
        """Move an unusable spool file out of the way (``<path>.unusable-<time>``), so
        that whatever it holds is kept for a person to look at; its new path, or None if
        it could not be moved (or there is no file)."""
        aside = f"{self.path}.unusable-{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            os.replace(self.path, aside)
        except OSError:
            return None
        return aside

    # -- blocking, off the loop -----------------------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        return await anyio.to_thread.run_sync(fn, *args)

    def _connect(self) -> sqlite3.Connection:
        import sqlite3  # here, not at the top: 1 MB of RSS that trackers without a spool skip

        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30.0)
        conn.execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut
        conn.execute(_SCHEMA)
        return conn

    def _load(self) -> list[SpooledBatch]:
        conn = self._connect()
        try:
            rows = conn.execute(
                "SELECT id, idempotency_key, events, body FROM batches ORDER BY id"
            ).fetchall()
        finally:
            conn.close()
        return [SpooledBatch(int(i), str(k), int(n), bytes(b)) for i, k, n, b in rows]

    def _write(self, key: str, n: int, body: bytes) -> int:
        conn = self._connect()
        try:
            with conn:
                cursor = conn.execute(
                    "INSERT INTO batches (created_at, idempotency_key, events, body) "
                    "VALUES (?, ?, ?, ?)",
                    (time.time(), key, n, body),
                )
                assert cursor.lastrowid is not None
                return cursor.lastrowid
        finally:
            conn.close()

    def _read(self, row_id: int) -> bytes | None:
        conn = self._connect()
        try:
            row = conn.execute("SELECT body FROM batches WHERE id = ?", (row_id,)).fetchone()
        finally:
            conn.close()
        return None if row is None else bytes(row[0])

    def _size(self) -> int:
        conn = self._connect()
        try:
            (size,) = conn.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM batches").fetchone()
        finally:
            conn.close()
        return int(size)

    def _commit(self, add: list[tuple[str, int, bytes]], remove: list[int]) -> None:
        conn = self._connect()
        try:
            with conn:
                now = time.time()
                conn.executemany(
                    "INSERT INTO batches (created_at, idempotency_key, events, body) "
                    "VALUES (?, ?, ?, ?)",
                    [(now, key, n, body) for key, n, body in add],
                )
                conn.executemany("DELETE FROM batches WHERE id = ?", [(i,) for i in remove])
        finally:
            conn.close()
