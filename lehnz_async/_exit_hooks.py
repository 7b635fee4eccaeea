"""The process-wide hooks: what the interpreter's exit and ``os.fork()`` do to every
live tracker.

Each loop binding registers itself here (`register`; held weakly, so a tracker that is
garbage is forgotten). Two hooks, installed once, at import, call each live binding:

- at interpreter exit, `Departing.exit_flush`: send what a tracker that was never closed
  still holds, within its ``exit_timeout`` (like the browser's ``keepalive``);
- in a forked child, `Departing.reset_after_fork`: an empty buffer, a fresh ledger and
  no session, so that events queued in the parent are sent once, by the parent.

What each does is the binding's (`_binding`); when and for whom, this module's.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from typing import Protocol

logger = logging.getLogger("lehnz_async")


class Departing(Protocol):
    """What a live binding does at exit and after a fork."""

    def exit_flush(self) -> None: ...

    def reset_after_fork(self) -> None: ...


_live: weakref.WeakSet[Departing] = weakref.WeakSet()
_live_lock = threading.Lock()


def register(binding: Departing) -> None:
    """Call ``binding``'s hooks at exit and after a fork, for as long as it lives."""
    with _live_lock:
        _live.add(binding)


def _at_exit() -> None:
    with _live_lock:
        bindings = list(_live)
    for binding in bindings:
        try:
            binding.exit_flush()
        except Exception:
            logger.exception("flushing a tracker at exit failed")


def _after_fork_in_child() -> None:
    global _live_lock
    _live_lock = threading.Lock()  # a thread of the parent may have held it
    for binding in list(_live):
        binding.reset_after_fork()
    if "multiprocessing" in sys.modules:
        # multiprocessing children leave through os._exit(), which skips atexit, but run
        # multiprocessing's own finalizers first
        from multiprocessing import util

        util.Finalize(None, _at_exit, exitpriority=10)


# Run before the interpreter shuts down thread pools: threading's own exit callbacks
# run first (last registered first), and concurrent.futures registers one that stops
# the default executor, which aiohttp needs to resolve host names. An exit hook in plain
# atexit would run after that and could not open a connection.
import concurrent.futures.thread  # noqa: E402, F401  (registers its callback first)

_register_threading_atexit = getattr(threading, "_register_atexit", None)
if _register_threading_atexit is not None:
    _register_threading_atexit(_at_exit)
else:  # pragma: no cover - CPython has had it since 3.9
    atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
