"""Where trackers run when the program gives them no loop, and what happens at exit and fork.

- `LoopThread`: an event loop of the tracker's own in a daemon thread, for programs with
  no running loop (scripts, thread-pool code, Celery-style workers, Flask/Django views).
- An ``atexit`` hook sends what live trackers still hold, within each one's
  ``exit_timeout`` (like the browser's ``keepalive``), for programs that never closed them.
- An ``os.register_at_fork`` hook gives each tracker in a forked child an empty queue, a
  fresh ledger and no session, so that events queued in the parent are sent once, by the
  parent.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
import weakref
from typing import Protocol

logger = logging.getLogger("lehnz_async")


class _Lifecycle(Protocol):
    def _exit_flush(self) -> None: ...

    def _reset_after_fork(self) -> None: ...


_live: weakref.WeakSet[_Lifecycle] = weakref.WeakSet()
_live_lock = threading.Lock()


def register(tracker: _Lifecycle) -> None:
    """Have the exit and fork hooks look after ``tracker`` while it is alive."""
    with _live_lock:
        _live.add(tracker)


class LoopThread:
    """An asyncio loop running forever in a daemon thread, until `stop()`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="lehnz_async-loop", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def stop(self) -> None:
        """Stop the loop (from any thread); the thread then closes it and ends."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)


def _at_exit() -> None:
    with _live_lock:
        trackers = list(_live)
    for tracker in trackers:
        try:
            tracker._exit_flush()
        except Exception:
            logger.exception("flushing a tracker at exit failed")


def _after_fork_in_child() -> None:
    global _live_lock
    _live_lock = threading.Lock()  # a thread of the parent may have held it
    for tracker in list(_live):
        tracker._reset_after_fork()
    if "multiprocessing" in sys.modules:
        # multiprocessing children leave through os._exit(), which skips atexit, but run
        # multiprocessing's own finalizers first
        from multiprocessing import util

        util.Finalize(None, _at_exit, exitpriority=10)


# Run before the interpreter shuts down thread pools: threading's own exit callbacks
# run first (last registered first), and concurrent.futures registers one that stops
# the default executor, which aiohttp needs to resolve host names. An exit hook in plain
# atexit would run after that and could not open a connection.
import concurrent.futures.thread  # noqa: E402,F401  (registers its callback first)

_register_threading_atexit = getattr(threading, "_register_atexit", None)
if _register_threading_atexit is not None:
    _register_threading_atexit(_at_exit)
else:  # pragma: no cover - CPython has had it since 3.9
    atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
