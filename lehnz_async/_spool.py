"""The durable spool: batches that could not be delivered in time, in a SQLite file.

One row per batch, holding its exact JSON body and its Idempotency-Key, so that a batch
re-sent from the spool is byte-for-byte the one that may already have reached the server
and a de-duplicating server keeps it once. All methods are blocking; the tracker calls
them through ``anyio.to_thread.run_sync``, never on the event loop. Each call opens its
own connection, so any worker thread may make it.

One spool file belongs to one process at a time: two live trackers sharing a file would
both re-send its rows (de-duplicated by the server through the Idempotency-Key, but sent
twice).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import sqlite3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    idempotency_key TEXT NOT NULL,
    events INTEGER NOT NULL,
    body BLOB NOT NULL
)
"""


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

    def _connect(self) -> sqlite3.Connection:
        import sqlite3  # here, not at the top: 1 MB of RSS that trackers without a spool skip

        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30.0)
        conn.execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut
        conn.execute(_SCHEMA)
        return conn

    def load(self) -> list[SpooledBatch]:
        """Every spooled batch, oldest first."""
        conn = self._connect()
        try:
            rows = conn.execute(
                "SELECT id, idempotency_key, events, body FROM batches ORDER BY id"
            ).fetchall()
        finally:
            conn.close()
        return [SpooledBatch(int(i), str(k), int(n), bytes(b)) for i, k, n, b in rows]

    def commit(self, add: list[tuple[str, int, bytes]], remove: list[int]) -> None:
        """In one transaction, add ``(key, n_events, body)`` rows and remove rows by id."""
        if not add and not remove:
            return
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
