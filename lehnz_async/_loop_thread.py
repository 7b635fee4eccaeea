"""A tracker's own event loop, where the program runs none: a loop in a daemon thread.

`LoopThread` runs an asyncio loop forever in a thread of its own (a real OS thread even
where gevent has patched ``threading``: see `_gevent`), until `LoopThread.stop`; the loop
binding starts one when ``track()`` or ``start()`` is called where no loop runs, or when
the program's loop was torn down with events left to send.
"""

from __future__ import annotations

import asyncio
import threading

from . import _gevent


def running_loop() -> asyncio.AbstractEventLoop | None:
    """This thread's running loop, or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class LoopThread:
    """An asyncio loop running forever in a daemon thread, until `stop()`."""

    def __init__(self) -> None:
        if _gevent.threading_patched():
            # a "thread" would be a greenlet on the hub's OS thread: run in a real one
            self.loop = _gevent.start_loop_thread(self._native_main)
            return
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="lehnz_async-loop", daemon=True)
        self.thread.start()

    def _native_main(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._main()

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
