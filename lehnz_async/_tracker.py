"""The public `Tracker`: a non-blocking queue in front of a background flusher."""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import aiohttp
import anyio
import anyio.abc
import anyio.lowlevel

from . import _batch
from ._config import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_INGEST_URL,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_MAX_RETRY_TIME,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_RETRY_BASE_DELAY,
    DEFAULT_RETRY_MAX_DELAY,
    Config,
    OnError,
    resolve_api_key,
)
from ._event import STANDARD_FAMILIES, VALID_FAMILIES, Event, build_event
from ._exceptions import (
    DeliveryError,
    EncodeError,
    InvalidEventError,
    ShutdownError,
    TrackerClosedError,
)
from ._sender import Sender
from ._stats import Ledger, Stats
from ._transport import Transport

logger = logging.getLogger("lehnz_async")

_DROP_LOG_INTERVAL = 10.0  # seconds between two warnings about a full queue


class _State(enum.Enum):
    NEW = "new"  # not started: track() queues, nothing is sent yet
    RUNNING = "running"  # the flusher task runs on `_loop`
    CLOSING = "closing"  # aclose() was called: the flusher drains and stops
    CLOSED = "closed"  # everything is settled; track() reports ShutdownError


class Tracker:
    """Collects events with a plain `track()` call and sends them in batches.

    ``track()`` never awaits, blocks or does I/O: it validates its arguments, builds an
    `Event` and appends it to an in-process queue. A background task cuts the queue into
    JSON arrays of at most ``max_batch_size`` events and ``max_batch_bytes`` bytes, sends
    each once it is full or its oldest event has waited ``flush_interval`` seconds, with
    up to ``max_concurrent_requests`` POSTs in flight, and retries what is retryable.
    Every event ends delivered, reported to ``on_error`` (counted as failed) or counted
    as dropped; `stats` shows each.

    Usage::

        async with Tracker("lehnz_pk_...") as tracker:
            tracker.track("usr_1", "view", item_id="prod_1")
            tracker.track("usr_1", "purchase", item_id="prod_1", context={"price": 49.99})
            await tracker.flush()  # optional: returns once all the above is settled

    Args:
        api_key: The publishable key (``lehnz_pk_...``); None reads ``LEHNZ_API_KEY``.
        endpoint: The ingestion URL.
        max_batch_size: Most events in one POST.
        flush_interval: Most seconds an event waits in the queue before its batch is sent.
        max_concurrent_requests: Most POSTs in flight at once.
        request_timeout: Seconds one POST may take before it counts as failed (retryable).
        on_error: Called on the event loop with each `DeliveryError`; what it raises is
            logged and ignored.
        max_batch_bytes: Most bytes in one POST body (a single larger event is sent alone).
        max_queue_size: Most events waiting; further ones are dropped (counted, logged).
        max_attempts: Attempts per batch, the first included, for retryable failures.
        max_retry_time: Seconds after a batch's first attempt when no retry starts.
        retry_base_delay: Backoff before jitter of the first retry; doubles each retry.
        retry_max_delay: Cap of the backoff before jitter (``Retry-After`` is obeyed as is).
        close_timeout: Default deadline of `aclose()`, in seconds.
        session: An `aiohttp.ClientSession` to use instead of the tracker's own; the
            tracker never closes it.

    Raises:
        ConfigurationError: a missing, secret or malformed key, or an unusable option.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        endpoint: str = DEFAULT_INGEST_URL,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        on_error: OnError | None = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_retry_time: float = DEFAULT_MAX_RETRY_TIME,
        retry_base_delay: float = DEFAULT_RETRY_BASE_DELAY,
        retry_max_delay: float = DEFAULT_RETRY_MAX_DELAY,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._config = config = Config(
            api_key=resolve_api_key(api_key),
            endpoint=endpoint,
            max_batch_size=max_batch_size,
            max_batch_bytes=max_batch_bytes,
            flush_interval=flush_interval,
            max_concurrent_requests=max_concurrent_requests,
            request_timeout=request_timeout,
            max_queue_size=max_queue_size,
            max_attempts=max_attempts,
            max_retry_time=max_retry_time,
            retry_base_delay=retry_base_delay,
            retry_max_delay=retry_max_delay,
            close_timeout=close_timeout,
            on_error=on_error,
        )
        self._queue: deque[Event] = deque()
        self._append = self._queue.append
        # track() takes its fast path while len(queue) < _threshold. The threshold is
        # max_batch_size while running (reaching it wakes the flusher), max_queue_size
        # once the flusher was woken, and 0 before start and after close, so that every
        # unusual case is decided off the hot path, in _enqueue_slow().
        self._threshold = 0
        self._state = _State.NEW
        self._ledger = Ledger()
        self._transport = Transport(
            config.endpoint,
            config.api_key,
            config.request_timeout,
            config.max_concurrent_requests,
            session,
        )
        self._sender = Sender(
            self._transport,
            self._ledger,
            self._report,
            max_attempts=config.max_attempts,
            max_retry_time=config.max_retry_time,
            retry_base_delay=config.retry_base_delay,
            retry_max_delay=config.retry_max_delay,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._drain_requested = False
        # first event sequence number of each batch not yet settled -> its size
        self._unsettled: dict[int, int] = {}
        # (sequence number, future): flush() calls waiting for all before it to settle
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._reported_kinds: set[tuple[type[DeliveryError], int | None]] = set()
        self._last_drop_log = -_DROP_LOG_INTERVAL
        self._drops_since_log = 0

    # -- the hot path -------------------------------------------------------------------

    def track(
        self,
        user_id: str,
        event_name: str,
        *,
        item_id: str | None = None,
        event_family: str | None = None,
        session_id: str | None = None,
        recommendation_id: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue one event; never awaits, blocks or does I/O.

        ``event_family`` is filled in for the standard names (view, search, click,
        add_to_cart, remove_from_cart: engagement; checkout_start, purchase: conversion).
        ``context`` is serialized when its batch is sent: do not mutate it afterwards.

        Raises:
            InvalidEventError: an empty or missing ``user_id``/``event_name``, an
                ``event_family`` outside the four, a custom name without a family, a
                ``context`` that is not a mapping, or an id that is not a str.
        """
        try:
            family = (
                STANDARD_FAMILIES[event_name]
                if event_family is None
                else VALID_FAMILIES[event_family]
            )
        except (KeyError, TypeError):
            family = ""
        if (
            not family
            or type(user_id) is not str
            or not user_id
            or type(event_name) is not str
            or not event_name
            or (context is not None and type(context) is not dict)
            or (item_id is not None and type(item_id) is not str)
            or (session_id is not None and type(session_id) is not str)
            or (recommendation_id is not None and type(recommendation_id) is not str)
        ):
            event = build_event(
                user_id,
                event_name,
                item_id,
                event_family,
                session_id,
                recommendation_id,
                context,
            )
        else:
            event = Event(
                user_id, family, event_name, item_id, session_id, recommendation_id, context
            )
        if len(self._queue) < self._threshold:
            self._append(event)
        else:
            self._enqueue_slow(event)

    def identify(
        self,
        user_id: str,
        previous_user_id: str,
        *,
        session_id: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue an identify event merging ``previous_user_id`` (anonymous) into ``user_id``.

        Raises:
            InvalidEventError: as for `track()`; ``previous_user_id`` is required.
        """
        if previous_user_id is None or previous_user_id == "":
            raise InvalidEventError("previous_user_id", "is required for identify events")
        event = build_event(
            user_id, "identify", None, "system", session_id, None, context, previous_user_id
        )
        if len(self._queue) < self._threshold:
            self._append(event)
        else:
            self._enqueue_slow(event)

    def _enqueue_slow(self, event: Event) -> None:
        state = self._state
        if state is _State.NEW:
            self._start_in_running_loop()
            state = self._state
        if state is _State.CLOSED or state is _State.CLOSING:
            self._ledger.discarded += 1
            self._report(
                ShutdownError("the tracker is closed; create a new Tracker to send more", [event])
            )
            return
        queue = self._queue
        if len(queue) >= self._config.max_queue_size:
            self._drop(event)
            return
        queue.append(event)
        if state is _State.RUNNING and len(queue) >= self._config.max_batch_size:
            self._threshold = self._config.max_queue_size
            self._wake_flusher()

    def _drop(self, event: Event) -> None:
        self._ledger.dropped += 1
        self._ledger.discarded += 1
        self._drops_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL:
            logger.warning(
                "queue full (max_queue_size=%d): dropped %d event(s) since the last warning, "
                "%d in all",
                self._config.max_queue_size,
                self._drops_since_log,
                self._ledger.dropped,
            )
            self._last_drop_log = now
            self._drops_since_log = 0

    def _wake_flusher(self) -> None:
        wake, loop = self._wake, self._loop
        if wake is None or loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    # -- lifecycle ------------------------------------------------------------------------

    def _start_in_running_loop(self) -> None:
        """Start the flusher if called inside a running loop; otherwise keep queueing."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._done = asyncio.Event()
        self._state = _State.RUNNING
        self._threshold = self._config.max_batch_size
        self._task = loop.create_task(self._run(), name="lehnz_async flusher")
        if self._queue:
            self._wake.set()  # events tracked before the loop ran

    async def start(self) -> None:
        """Start the background flusher now (track() also starts it, lazily).

        Raises:
            TrackerClosedError: the tracker was closed; closed trackers cannot restart.
        """
        if self._state is _State.NEW:
            self._start_in_running_loop()
        elif self._state is not _State.RUNNING:
            raise TrackerClosedError(
                "this Tracker was closed and cannot be restarted; create a new Tracker"
            )

    async def __aenter__(self) -> Tracker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def flush(self) -> None:
        """Return once every event tracked before this call is delivered or reported.

        Partial batches are sent at once instead of waiting for ``flush_interval``.
        Wrap it in ``anyio.move_on_after()`` (or ``asyncio.timeout()``) to bound the wait.
        """
        if self._state is _State.NEW:
            self._start_in_running_loop()
        target = self._ledger.taken + len(self._queue)
        if self._state is _State.CLOSED or self._settled_before(target):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, future))
        self._drain_requested = True
        self._wake_flusher()
        await future

    async def aclose(self, timeout: float | None = None) -> None:
        """Send what is queued, wait for it to settle, then release the HTTP session.

        Idempotent. Shielded from cancellation of the calling task, so that an app being
        cancelled still flushes, but bounded: after ``timeout`` seconds (default
        ``close_timeout``) what is still unsettled is reported to ``on_error`` as
        `ShutdownError`.
        """
        deadline = self._config.close_timeout if timeout is None else timeout
        if self._state is _State.NEW:
            self._start_in_running_loop()
        if self._state is _State.NEW:  # no running loop (cannot happen in a coroutine)
            self._state = _State.CLOSED
            return
        if self._state is _State.RUNNING:
            self._state = _State.CLOSING
            self._threshold = 0
            self._wake_flusher()
        assert self._done is not None and self._task is not None
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(deadline):
                await self._done.wait()
            if not self._done.is_set():
                logger.warning(
                    "close deadline of %.1f s passed with %d event(s) unsettled; "
                    "reporting them to on_error",
                    deadline,
                    self._ledger.in_flight + len(self._queue),
                )
                self._task.cancel()
                await self._done.wait()
        # everything is settled; now let a cancellation of the caller take its course
        await anyio.lowlevel.checkpoint_if_cancelled()

    # -- the flusher ----------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._done is not None
        try:
            await self._transport.open()
            async with anyio.create_task_group() as tg:
                await self._flush_loop(tg)
        finally:
            self._state = _State.CLOSED
            self._threshold = 0
            leftovers = list(self._queue)
            self._queue.clear()
            if leftovers:  # tracked by another thread while the last batch was cut
                self._ledger.discarded += len(leftovers)
                self._report(
                    ShutdownError("the tracker closed before these events were sent", leftovers)
                )
            with anyio.CancelScope(shield=True):
                await self._transport.close()
            self._release_flush_waiters(all_=True)
            self._done.set()

    async def _flush_loop(self, tg: anyio.abc.TaskGroup) -> None:
        assert self._wake is not None
        config = self._config
        queue = self._queue
        slots = anyio.Semaphore(config.max_concurrent_requests)
        interval = config.flush_interval
        next_tick = time.monotonic() + interval
        while True:
            closing = self._state is not _State.RUNNING
            if len(queue) < config.max_batch_size and not self._drain_requested and not closing:
                with anyio.move_on_after(next_tick - time.monotonic()):
                    await self._wake.wait()
            self._wake.clear()
            now = time.monotonic()
            drain = self._drain_requested or self._state is not _State.RUNNING
            if now >= next_tick:
                drain = True
                next_tick = now + interval
            self._drain_requested = False
            while queue and (drain or len(queue) >= config.max_batch_size):
                await slots.acquire()  # cut only when a slot is free: fuller batches
                if not self._cut_and_send(tg, slots):
                    slots.release()
            if self._state is _State.RUNNING:
                self._threshold = config.max_batch_size
            elif not queue:
                return  # closing and drained; the task group waits for what is in flight

    def _cut_and_send(self, tg: anyio.abc.TaskGroup, slots: anyio.Semaphore) -> bool:
        config = self._config
        ledger = self._ledger
        cut = _batch.cut(self._queue, config.max_batch_size, config.max_batch_bytes)
        if cut is None:
            return False
        seq = ledger.taken
        taken = len(cut.events) + len(cut.unencodable)
        ledger.taken += taken
        ledger.in_flight += taken
        for event, reason in cut.unencodable:
            ledger.in_flight -= 1
            self._report(EncodeError(f"the event could not be encoded: {reason}", [event]))
        if not cut.events:
            self._release_flush_waiters()
            return False
        ledger.batches += 1
        self._unsettled[seq] = len(cut.events)
        tg.start_soon(self._send, seq, cut.events, cut.body, slots)
        return True

    async def _send(
        self, seq: int, events: list[Event], body: bytes, slots: anyio.Semaphore
    ) -> None:
        try:
            await self._sender.deliver(events, body)
        finally:
            slots.release()
            del self._unsettled[seq]
            self._release_flush_waiters()

    def _settled_before(self, target: int) -> bool:
        """Whether every event with a sequence number below ``target`` is settled."""
        return self._ledger.taken >= target and all(seq >= target for seq in self._unsettled)

    def _release_flush_waiters(self, all_: bool = False) -> None:
        waiting = []
        for target, future in self._flush_waiters:
            if all_ or self._settled_before(target):
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((target, future))
        self._flush_waiters = waiting

    # -- outcomes -------------------------------------------------------------------------

    def _report(self, error: DeliveryError) -> None:
        """Count ``error``'s events as failed, log the first of its kind, call on_error."""
        self._ledger.failed += len(error.events)
        kind = (type(error), error.status)
        level = logging.DEBUG if kind in self._reported_kinds else logging.WARNING
        self._reported_kinds.add(kind)
        logger.log(level, "%d event(s) not delivered: %s", len(error.events), error)
        callback = self._config.on_error
        if callback is not None:
            try:
                callback(error)
            except Exception:
                logger.exception("on_error raised; the error it was given is logged above")

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters (see `Stats`)."""
        ledger = self._ledger
        queued = len(self._queue)
        return Stats(
            tracked=ledger.taken + queued + ledger.discarded,
            delivered=ledger.delivered,
            failed=ledger.failed,
            dropped=ledger.dropped,
            queued=queued,
            in_flight=ledger.in_flight,
            batches=ledger.batches,
            requests=ledger.requests,
            retries=ledger.retries,
        )

    @property
    def closed(self) -> bool:
        """Whether `aclose()` has finished (or the flusher stopped)."""
        return self._state is _State.CLOSED

    def __repr__(self) -> str:
        return f"<Tracker {self._state.value} endpoint={self._config.endpoint!r} {self.stats}>"
