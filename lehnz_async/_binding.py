"""Where a tracker runs: the event loop it is bound to, one run at a time.

`LoopBinding` owns the tracker's state machine (NEW → STARTING → RUNNING → CLOSING →
CLOSED), the event loop the flusher runs on (the caller's, or a `LoopThread` of the
tracker's own where no loop runs), adoption of a loop that was torn down without
``aclose()`` (its batches go back to the buffer and the flusher resumes elsewhere), the
bridging of calls from other loops (`on_loop`) and other threads (`block_on_loop`), the
cancellation-proof close, and what the binding does at interpreter exit (`exit_flush`:
send what a never-closed tracker holds, within ``exit_timeout``) and in a forked child
(`reset_after_fork`: start empty). The thread of its own loop is `_loop_thread`'s; the
process-wide exit and fork hooks that call each live binding are `_exit_hooks`'.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from . import _gevent
from ._buffer import Buffer
from ._exceptions import BlockingCallError, ConfigurationError, ShutdownError
from ._exit_hooks import register
from ._flusher import Flusher
from ._ledger import Ledger
from ._loop_thread import LoopThread, running_loop

logger = logging.getLogger("lehnz_async")
_T = TypeVar("_T")


#: Seconds beyond ``exit_timeout`` that the exit hook waits for the tracker's loop to
#: answer before it reports what is left as ShutdownError (a loop that never runs).
EXIT_MARGIN = 2.0


class State(enum.Enum):
    NEW = "new"  # not started: track() queues, nothing is sent yet
    STARTING = "starting"  # its own loop thread is starting the flusher
    RUNNING = "running"  # the flusher task runs on `loop`
    CLOSING = "closing"  # aclose() was called: the flusher drains and stops
    CLOSED = "closed"  # everything is settled; track() reports ShutdownError


class LoopBinding:
    """Binds one tracker's buffer, ledger and flushers to event loops, one run at a time.

    Args:
        buffer: The tracker's buffer.
        ledger: The tracker's ledger.
        make_flusher: Makes the flusher of a new run; its argument says whether the run
            replays the spool.
        forget_sessions: Called when a loop is left (adoption, fork): drop sessions bound
            to it.
        close_sessions: Awaited on the loop at the end of a close.
        exit_timeout: Seconds the exit hook gives a tracker that was never closed.
        clock: Marks the close deadline from the closing thread (`_seams`).
        resume_in_thread: Whether a run that lost its loop resumes at once on a loop
            thread of its own (as in production, while threads can still be started) or
            waits for the next call from a running loop (the deterministic simulation,
            where a thread would let real time in).
    """

    def __init__(
        self,
        buffer: Buffer,
        ledger: Ledger,
        make_flusher: Callable[[bool], Flusher],
        forget_sessions: Callable[[], None],
        close_sessions: Callable[[], Coroutine[Any, Any, None]],
        exit_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        resume_in_thread: bool = True,
    ) -> None:
        if _gevent.threading_patched() and (why := _gevent.check_version()) is not None:
            raise ConfigurationError(why)
        self.state = State.NEW
        self.loop: asyncio.AbstractEventLoop | None = None
        self.flusher: Flusher | None = None  # the current run's, while started
        self._buffer = buffer
        self._ledger = ledger
        self._make_flusher = make_flusher
        self._forget_sessions = forget_sessions
        self._close_sessions = close_sessions
        self._exit_timeout = exit_timeout
        self._clock = clock
        self.resume_in_thread = resume_in_thread
        self._lock = threading.RLock()  # state changes, from any thread
        self._loop_thread = 0  # threading.get_ident() of the loop's thread
        self._own_loop: LoopThread | None = None  # where no loop of the program runs
        self._task: asyncio.Task[None] | None = None
        self._replay_spool = True
        buffer.wake = self.wake
        buffer.freeze = self.freeze
        register(self)  # exit_flush() at exit, reset_after_fork() in a forked child

    @property
    def closing(self) -> bool:
        """Whether aclose() has begun (or finished)."""
        return self.state is State.CLOSING or self.state is State.CLOSED

    # -- starting -------------------------------------------------------------------------

    def ensure_started(self, own_thread: bool = False) -> None:
        """Start the flusher if it is not running: on this thread's running loop, or, where
        no loop runs (or ``own_thread``), on a loop of the tracker's own in a background
        thread. Any thread."""
        with self._lock:
            if self.state is not State.NEW:
                return
            loop = None if own_thread else running_loop()
            if loop is None:
                self._own_loop = LoopThread()
                self.loop = self._own_loop.loop
                self.state = State.STARTING
                self.loop.call_soon_threadsafe(self._begin)
                return
            self.loop = loop
            self._begin()

    def _begin(self) -> None:
        """Start the flusher task; on the tracker's loop, its thread, with the loop running."""
        with self._lock:
            if self.state is not State.NEW and self.state is not State.STARTING:
                return
            loop = asyncio.get_running_loop()
            self.loop = loop
            self._loop_thread = threading.get_ident()
            self.flusher = flusher = self._make_flusher(self._replay_spool)
            self._replay_spool = False  # once per tracker: later runs would re-read its rows
            self.state = State.RUNNING
            self._buffer.open()
            self._task = loop.create_task(self._run(flusher), name="lehnz_async flusher")
            if self._buffer.queued or self._ledger.backlog:
                flusher.wake.set()  # events tracked before the loop ran

    async def _run(self, flusher: Flusher) -> None:
        try:
            await flusher.run()
        finally:
            with self._lock:
                if flusher.orphaned:
                    self._unbind()
                    if self.resume_in_thread and (self._buffer.queued or self._ledger.backlog):
                        # Carry on in a thread of our own now, while threads can still
                        # be started: Python 3.12+ refuses new threads once the
                        # interpreter is shutting down, when the exit hook runs.
                        logger.warning(
                            "the event loop stopped the tracker without aclose(); its "
                            "%d event(s) go on in a background thread (close the "
                            "tracker, or use asgi.lifespan, to flush on your own terms)",
                            self._buffer.queued + self._ledger.in_flight,
                        )
                        self.ensure_started(own_thread=True)
                else:
                    self.state = State.CLOSED
                    self._buffer.shut()

    def wake(self) -> None:
        """Wake the running flusher, from any thread (track(), when a batch is full)."""
        flusher, loop = self.flusher, self.loop
        if flusher is None or loop is None:
            return
        try:
            if threading.get_ident() == self._loop_thread:
                flusher.wake.set()
            else:
                loop.call_soon_threadsafe(flusher.wake.set)
        except RuntimeError:
            if not loop.is_closed():
                raise
            # closed without being torn down (its tasks never cancelled): it will never
            # send; move what it held to a loop that runs, and never raise into track()
            self.adopt()
            self.ensure_started()

    def freeze(self) -> None:
        """Have the running flusher freeze the contexts of the events waiting (a call on
        its loop, from any thread; see `Flusher.freeze`)."""
        flusher, loop = self.flusher, self.loop
        if flusher is None or loop is None:
            self._buffer.freezing = False
            return
        try:
            if threading.get_ident() == self._loop_thread:
                loop.call_soon(flusher.freeze)
            else:
                loop.call_soon_threadsafe(flusher.freeze)
        except RuntimeError:  # the loop is closed: wake() deals with it on the next batch
            self._buffer.freezing = False

    # -- bridging -------------------------------------------------------------------------

    async def on_loop(self, fn: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Await ``fn()`` run on the tracker's loop, from whichever loop the caller is on."""
        loop = self.serving_loop()
        if loop is asyncio.get_running_loop():
            return await fn()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(), loop))

    def block_on_loop(self, fn: Callable[[], Coroutine[Any, Any, _T]], timeout: float | None) -> _T:
        """Run ``fn()`` on the tracker's loop and block this thread until it is done.

        Raises:
            BlockingCallError: this thread runs the tracker's loop (it would deadlock).
            TimeoutError: not done within ``timeout`` seconds (then it is cancelled).
        """
        loop = self.serving_loop()
        if threading.get_ident() == self._loop_thread or running_loop() is loop:
            raise BlockingCallError(
                "this blocking method was called on the event loop that runs the tracker, "
                "where it would wait forever; await the async form (flush(), aclose()) instead"
            )
        future = asyncio.run_coroutine_threadsafe(fn(), loop)
        try:
            if _gevent.threading_patched():
                return _gevent.wait(future, timeout)  # the hub runs meanwhile
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"not done within {timeout} s") from None

    def serving_loop(self) -> asyncio.AbstractEventLoop:
        """The loop to run the tracker's coroutines on, started (or adopted) if need be.

        Raises:
            BlockingCallError: the tracker runs on a loop that exists but is not running.
        """
        if self._loop_stopped():
            assert self.loop is not None
            if not self.loop.is_closed():
                raise BlockingCallError(
                    "the tracker runs on an event loop that is not running now; call this "
                    "from that loop, or close the tracker there with `await tracker.aclose()`"
                )
            self.adopt()  # a closed loop never runs again
        self.ensure_started()
        assert self.loop is not None
        return self.loop

    # -- flushing and closing -------------------------------------------------------------

    async def flush(self) -> None:
        if self.flusher is not None:
            await self.flusher.flush()

    async def wait_for_room(self) -> None:
        if self.flusher is not None:
            await self.flusher.wait_for_room()

    def _nothing_to_close(self) -> bool:
        """Never started, nothing to send, no spool to replay: close without a session."""
        with self._lock:
            if (
                self.state is State.NEW
                and not self._buffer.queued
                and not self._ledger.backlog
                and (self._ledger.spool is None or not self._replay_spool)
            ):
                self.state = State.CLOSED
                return True
        return self.state is State.CLOSED

    async def aclose(self, timeout: float) -> None:
        """Close on the tracker's loop, whatever cancels the caller meanwhile.

        The close runs to its own deadline (``timeout``); a cancellation of the caller
        (asyncio's own, or an anyio cancel scope) is delivered after it. A second asyncio
        cancellation brings the deadline forward to now: what is unsettled is spooled or
        reported at once, then the cancellation is delivered.
        """
        if self._nothing_to_close():
            return
        self._mark_deadline(timeout)
        loop = self.serving_loop()
        if loop is asyncio.get_running_loop():
            close: asyncio.Future[None] = loop.create_task(self._close(timeout))
        else:
            close = asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self._close(timeout), loop)
            )
        cancels = 0
        with anyio.CancelScope(shield=True):
            while not close.done():
                try:
                    await asyncio.shield(close)
                except asyncio.CancelledError:
                    if close.cancelled():
                        break
                    cancels += 1
                    if cancels == 2:
                        logger.info("aclose() cancelled twice: giving up what is unsettled now")
                        loop.call_soon_threadsafe(self._hurry)
        self._stop_own_loop()
        if cancels:
            raise asyncio.CancelledError
        close.result()
        await anyio.lowlevel.checkpoint_if_cancelled()

    def close_blocking(self, timeout: float, bound: float | None = None) -> None:
        """The blocking form of `aclose`, from a thread that does not run the loop;
        ``bound``: at most that many seconds of waiting for the loop (TimeoutError)."""
        if self._nothing_to_close():
            return
        self._mark_deadline(timeout)
        self.block_on_loop(lambda: self._close(timeout), bound)
        self._stop_own_loop()

    def _mark_deadline(self, timeout: float) -> None:
        """The close deadline counts from the call, even if the loop is busy (a hook that
        blocks it) when it comes: the flusher reads it between hook calls."""
        flusher = self.flusher
        if flusher is not None:
            flusher.deadline_at = min(flusher.deadline_at, self._clock() + timeout)

    def _hurry(self) -> None:
        if self.flusher is not None:
            self.flusher.hurry()

    async def _close(self, timeout: float) -> None:
        """The close, on the tracker's loop."""
        flusher, task = self.flusher, self._task
        if flusher is not None and task is not None:
            with self._lock:
                if self.state is State.RUNNING:
                    self.state = State.CLOSING
                    self._buffer.shut()
            await flusher.close(timeout)
        with anyio.CancelScope(shield=True):
            await self._close_sessions()

    def _stop_own_loop(self) -> None:
        if self._own_loop is not None:
            self._own_loop.stop()
            self._own_loop = None

    # -- leaving a loop -------------------------------------------------------------------

    def _loop_stopped(self) -> bool:
        """Whether the program's loop this tracker runs on is closed or not running."""
        loop = self.loop
        return (
            self._own_loop is None
            and loop is not None
            and (self.state is State.RUNNING or self.state is State.CLOSING)
            and (loop.is_closed() or not loop.is_running())
        )

    def adopt(self) -> None:
        """Leave a loop that will never run again, keeping every batch for the next one."""
        with self._lock:
            flusher = self.flusher
            if flusher is not None and not flusher.done.is_set():
                flusher.orphaned = True
                self._ledger.backlog.requeue()
            self._unbind()

    def _unbind(self) -> None:
        """Back to NEW, not bound to any loop (that loop is gone, or in another process)."""
        self.state = State.NEW
        self._buffer.shut()
        self.loop = None
        self._loop_thread = 0
        self._task = None
        self.flusher = None
        self._forget_sessions()

    def exit_flush(self) -> None:
        """At interpreter exit: send what is left, within ``exit_timeout`` seconds."""
        if self.state is State.CLOSED:
            return
        if self._loop_stopped():  # it will not run again: send from a loop of our own
            self.adopt()
        buffer = self._buffer
        if self.state is State.NEW and not buffer.queued and not self._ledger.backlog:
            return
        logger.info(
            "sending %d event(s) left at exit (tracker never closed; exit_timeout=%.1f s)",
            buffer.queued + self._ledger.in_flight,
            self._exit_timeout,
        )
        try:
            self.close_blocking(self._exit_timeout, bound=self._exit_timeout + EXIT_MARGIN)
        except TimeoutError:  # the loop never answered (a deadlocked fork child, say)
            self._fail_at_exit(
                f"the tracker's event loop did not answer within "
                f"{self._exit_timeout + EXIT_MARGIN:.1f} s"
            )
        except RuntimeError as exc:  # no thread can start at shutdown (Python 3.12+)
            self._fail_at_exit(str(exc))

    def _fail_at_exit(self, why: str) -> None:
        """Nothing can be sent any more: report what is left, never lose it silently."""
        message = (
            f"the interpreter exited with these events unsent and no way left to send "
            f"them ({why}); close the tracker before exiting"
        )
        for batch in self._ledger.backlog.sweep():
            self._ledger.give_up(batch, ShutdownError(message, batch.events))
        hooked = self.flusher.abandon_hooked() if self.flusher is not None else []
        self._ledger.moving()
        leftovers = hooked + list(self._buffer.staged) + list(self._buffer.events)
        self._buffer.staged.clear()
        self._buffer.events.clear()
        if leftovers:
            self._ledger.fail_taken(leftovers, ShutdownError(message, leftovers))
        self._ledger.moved()
        self.state = State.CLOSED

    def reset_after_fork(self) -> None:
        """In a forked child: start empty; the parent sends what it had queued."""
        self._lock = threading.RLock()
        self._own_loop = None
        self._buffer.events.clear()  # in a fork child no other thread can be appending
        self._buffer.staged.clear()
        self._ledger.reset()  # and its backlog
        self._unbind()
        self._replay_spool = False  # the parent's spool is the parent's to send
