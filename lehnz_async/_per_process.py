"""One tracker per process, for the framework integrations (Django, Flask, Celery).

A `ProcessTracker` makes the tracker once, when it is first asked for, and starts it on
a loop thread of its own once in each process, at the first `get` there: after a fork
(gunicorn ``--preload``, Celery's prefork pool) the engine gives the child's copy an
empty buffer, and the child starts it. `make` makes it without starting it, for a
process that may fork afterwards: a thread running in a process when it forks may hold
locks (an import's, for one) that stay held forever in the child.

It never binds the tracker to the caller's event loop: frameworks run ``async def``
views under WSGI on a short-lived loop each (asgiref's ``async_to_sync``), which would
stop a tracker bound to it. Uses only the tracker's public API (``with tracker:`` starts
it where no loop runs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

from ._exceptions import TrackerClosedError
from ._tracker import Tracker

logger = logging.getLogger("lehnz_async")

__all__ = ["ProcessTracker"]


class ProcessTracker:
    """Holds a program's tracker and starts it in each process it is used in.

    Args:
        make: A `Tracker`, or a function that makes one (called at the first `get`, and
            again if the tracker was closed and is asked for afterwards).
    """

    def __init__(self, make: Tracker | Callable[[], Tracker]) -> None:
        self._make = make
        self._tracker: Tracker | None = None
        self._pid = 0  # the process the tracker was last started in
        self._lock = threading.Lock()
        _holders.add(self)

    def make(self) -> Tracker:
        """The tracker, made if need be, not started: to check the options at startup
        without starting a thread in a process that may fork afterwards."""
        with self._lock:
            return self._made()

    def get(self) -> Tracker:
        """The tracker, made if need be and started in this process (cheap once started)."""
        tracker = self._tracker
        if tracker is not None and self._pid == os.getpid() and not tracker.closed:
            return tracker
        with self._lock:
            tracker = self._made()
            if self._pid != os.getpid():
                _start_off_loop(tracker)
                self._pid = os.getpid()
            return tracker

    def _made(self) -> Tracker:
        tracker = self._tracker
        if tracker is None or (tracker.closed and not isinstance(self._make, Tracker)):
            tracker = self._tracker = self._new()
            self._pid = 0  # a new tracker: start it where it is next asked for
        return tracker

    def close(self, timeout: float | None = None) -> float:
        """Close the tracker, if one was made: send what it holds, within ``timeout``
        seconds (the tracker's ``close_timeout`` if None).

        Returns the seconds it took. Never raises: a failure is logged (the events it
        could not settle were reported to ``on_error`` by the tracker).
        """
        tracker, began = self._existing(), time.monotonic()
        if tracker is None or tracker.closed:
            return 0.0
        try:
            tracker.close(timeout)
        except Exception:
            logger.exception("closing the tracker of process %d failed", os.getpid())
        took = time.monotonic() - began
        logger.debug("closed the tracker of process %d in %.3f s: %s", os.getpid(), took, tracker)
        return took

    async def aclose(self, timeout: float | None = None) -> None:
        """`close`, awaited: for an ASGI server's shutdown, on its event loop."""
        tracker = self._existing()
        if tracker is not None and not tracker.closed:
            await tracker.aclose(timeout)

    def _existing(self) -> Tracker | None:
        """The tracker if one was made, or was given as such (and maybe used directly)."""
        if self._tracker is None and isinstance(self._make, Tracker):
            return self._make
        return self._tracker

    def _new(self) -> Tracker:
        tracker = self._make if isinstance(self._make, Tracker) else self._make()
        if not isinstance(tracker, Tracker):
            raise TypeError(f"the tracker factory returned {type(tracker).__name__}, not Tracker")
        return tracker


def _start(tracker: Tracker) -> None:
    # a closed tracker stays closed: its track() reports to on_error as ShutdownError
    with contextlib.suppress(TrackerClosedError):
        tracker.__enter__()  # `with tracker:` without its close: starts it off any loop


def _start_off_loop(tracker: Tracker) -> None:
    """Start ``tracker`` on a loop thread of its own, even when called on a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        _start(tracker)
        return
    # Here the tracker would bind to this loop, which may be short-lived: start it from
    # a thread that runs no loop (a few milliseconds, once per process).
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lehnz_async-start") as pool:
        pool.submit(_start, tracker).result()


_holders: weakref.WeakSet[ProcessTracker] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for holder in list(_holders):
        holder._lock = threading.Lock()  # a thread of the parent may have held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
