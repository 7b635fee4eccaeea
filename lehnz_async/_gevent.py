"""gevent: the tracker's own loop in a real OS thread, and waits that let the hub run.

Where gevent has monkey-patched ``threading`` (``gunicorn -k gevent``, ``patch_all()``),
a ``threading.Thread`` is a greenlet on the hub's OS thread. An asyncio loop run there
would be "the running loop" of every greenlet (asyncio keeps it per OS thread), so every
blocking call (``flush_sync()``, ``close()``, the exit hook) would look like a call from
the tracker's own loop. Instead the tracker's loop runs in a real OS thread, started
with the functions gevent saved before patching, and a greenlet that waits for it waits
cooperatively: the hub, and every other greenlet, keep running meanwhile.

Nothing here imports gevent unless the program already did and patched ``threading``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")

#: The gevent releases whose locks and events work across native threads (20.12.0).
MIN_VERSION = (20, 12)


def threading_patched() -> bool:
    """Whether gevent has monkey-patched ``threading`` in this process."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    try:
        return bool(monkey.is_module_patched("threading"))
    except Exception:  # a gevent too old or too new to ask: assume not
        return False


def _monkey() -> Any:
    return importlib.import_module("gevent.monkey")


def check_version() -> str | None:
    """Why this gevent cannot run the tracker, or None if it can."""
    gevent: Any = importlib.import_module("gevent")
    release = str(getattr(gevent, "__version__", "0"))  # version_info is stale in gevent
    version = tuple(int(part) for part in re.findall(r"\d+", release)[:2])
    if version < MIN_VERSION:
        return (
            f"gevent {release} has monkey-patched threading, and "
            f"the tracker needs gevent >= {MIN_VERSION[0]}.{MIN_VERSION[1]} there (locks and "
            "events that work across native threads): upgrade gevent, or make the tracker "
            "before monkey-patching and close it with `await tracker.aclose()` from asyncio"
        )
    return None


def start_loop_thread(
    run: Callable[[asyncio.AbstractEventLoop], None],
) -> asyncio.AbstractEventLoop:
    """Make an event loop in a new native thread and run ``run(loop)`` there.

    The loop is made in that thread, so that what it registers (gevent's selector, its
    sockets) belongs to that thread's own hub, never to the caller's. Returns the loop
    once it exists (a few hundred microseconds, the only time the caller's hub waits).
    """
    monkey = _monkey()
    ready = monkey.get_original("_thread", "allocate_lock")()
    made: list[asyncio.AbstractEventLoop | BaseException] = []

    def main() -> None:
        try:
            loop = asyncio.new_event_loop()
        except BaseException as exc:
            made.append(exc)
            ready.release()
            raise
        made.append(loop)
        ready.release()
        run(loop)

    ready.acquire()
    monkey.get_original("_thread", "start_new_thread")(main, ())
    ready.acquire()  # released by the thread once its loop exists
    result = made[0]
    if isinstance(result, BaseException):
        raise result
    return result


def wait(future: concurrent.futures.Future[_T], timeout: float | None) -> _T:
    """``future.result(timeout)`` for a greenlet: the hub runs the other greenlets while
    this one waits for a future that a native thread completes.

    Raises:
        concurrent.futures.TimeoutError: not done within ``timeout`` seconds.
    """
    gevent: Any = importlib.import_module("gevent")
    done = gevent.event.Event()
    # An async watcher is the thread-safe way to wake this hub; while started it also
    # keeps the hub's loop alive (a hub with nothing else to wait for would raise
    # LoopExit). The native lock makes sure the watcher is never sent once closed.
    watcher = gevent.get_hub().loop.async_()
    guard = _monkey().get_original("_thread", "allocate_lock")()
    closed = False

    def notify(_: object) -> None:
        with guard:
            if not closed:
                watcher.send()

    watcher.start(done.set)
    try:
        future.add_done_callback(notify)
        done.wait(timeout)
    finally:
        with guard:
            closed = True
            watcher.close()
    return future.result(0)
