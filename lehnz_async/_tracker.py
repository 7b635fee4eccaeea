"""The public `Tracker`: a non-blocking queue in front of a background flusher."""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import msgspec

from . import _runtime
from ._config import (
    API_KEY_ENV,
    CAPTURE_API_KEY,
    DEFAULT_ATTRIBUTION_MAX_USERS,
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_EXIT_TIMEOUT,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_MAX_RETRY_TIME,
    DEFAULT_OVERFLOW,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_RETRY_BASE_DELAY,
    DEFAULT_RETRY_MAX_DELAY,
    Config,
    OnError,
    resolve_api_key,
    resolve_endpoint,
)
from ._event import FAST_FAMILIES, STANDARD_FAMILIES, Event, build_event
from ._exceptions import (
    AuthenticationError,
    BlockingCallError,
    DeliveryError,
    InvalidEventError,
    LehnzError,
    RecommendationError,
    ShutdownError,
    TrackerClosedError,
)
from ._flusher import Flusher
from ._recommend import Attribution, Recommendation, recommendation_decoder, resolve_recommend_url
from ._runtime import LoopThread
from ._spool import Spool
from ._stats import Ledger, Stats
from ._transport import (
    BatchTransport,
    CaptureTransport,
    Transport,
    TransportFailure,
    error_message,
)

logger = logging.getLogger("lehnz_async")

_DROP_LOG_INTERVAL = 10.0  # seconds between two warnings about a full queue
_T = TypeVar("_T")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _State(enum.Enum):
    NEW = "new"  # not started: track() queues, nothing is sent yet
    STARTING = "starting"  # its own loop thread is starting the flusher
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
        endpoint: The ingestion URL; None reads ``LEHNZ_ENDPOINT``, else the documented
            URL (`DEFAULT_INGEST_URL`).
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
        exit_timeout: Deadline of the exit hook that sends what a tracker that was never
            closed still holds when the interpreter exits.
        overflow: What `track()` does with a full queue: ``"drop_newest"`` (the event
            being tracked) or ``"drop_oldest"`` (the longest waiting). `atrack()` waits
            for room instead.
        spool_path: A SQLite file for batches not delivered in time (retries ran out on
            a retryable failure, or the close deadline passed); they are re-sent, oldest
            first, when a tracker with the same ``spool_path`` next starts.
        session: An `aiohttp.ClientSession` to use instead of the tracker's own; the
            tracker never closes it.
        capture: Record batches in memory instead of sending them, for tests: see
            `captured` and `lehnz_async.testing.assert_tracked`. Everything but the HTTP
            runs for real; no key is needed.
        recommend_endpoint: The ``/recommend`` URL for `recommend()`; None means the
            documented one, or ``/recommend`` on the ingest host when ``endpoint`` is not
            the documented URL (a local reference server).
        attribution_ttl: Off by default. Seconds for which items returned by
            `recommend()` are remembered per user: a later `track()` about such an item
            without a ``recommendation_id`` gets that recommendation's id.
        attribution_max_users: Most users remembered for attribution (least recently
            used are forgotten first).

    Raises:
        ConfigurationError: a missing, secret or malformed key, or an unusable option.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        endpoint: str | None = None,
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
        exit_timeout: float = DEFAULT_EXIT_TIMEOUT,
        overflow: str = DEFAULT_OVERFLOW,
        spool_path: str | os.PathLike[str] | None = None,
        session: aiohttp.ClientSession | None = None,
        capture: bool = False,
        recommend_endpoint: str | None = None,
        attribution_ttl: float | None = None,
        attribution_max_users: int = DEFAULT_ATTRIBUTION_MAX_USERS,
    ) -> None:
        if capture and api_key is None and not os.environ.get(API_KEY_ENV):
            api_key = CAPTURE_API_KEY
        self._config = config = Config(
            api_key=resolve_api_key(api_key),
            endpoint=resolve_endpoint(endpoint),
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
            exit_timeout=exit_timeout,
            overflow=overflow,
            spool_path=None if spool_path is None else os.fspath(spool_path),
            attribution_ttl=attribution_ttl,
            attribution_max_users=attribution_max_users,
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
        self._capture = CaptureTransport() if capture else None
        self._transport: BatchTransport = self._capture or Transport(
            config.endpoint,
            config.api_key,
            config.request_timeout,
            config.max_concurrent_requests,
            session,
        )
        self._spool = None if config.spool_path is None else Spool(config.spool_path)
        self._lock = threading.RLock()  # start/stop, and counters touched off the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0  # threading.get_ident() of the loop's thread
        self._own_loop: LoopThread | None = None  # where no loop of the program runs
        self._replay_spool_at_start = True
        self._task: asyncio.Task[None] | None = None
        self._flusher: Flusher | None = None  # the current run's, while started
        # kinds of failure already logged at WARNING/ERROR; later ones go to DEBUG
        self._reported_kinds: set[tuple[type, int | None]] = set()
        self._last_drop_log = -_DROP_LOG_INTERVAL
        self._drops_since_log = 0
        self._recommend_url = resolve_recommend_url(recommend_endpoint, config.endpoint)
        self._attribution: Attribution | None = None
        if config.attribution_ttl is not None:
            self._attribution = Attribution(config.attribution_ttl, attribution_max_users)
            # attribution only costs the trackers that turn it on: the plain track()
            # stays as it is, this instance's is a wrapper that fills recommendation_id
            setattr(self, "track", self._track_attributed)  # noqa: B010
        _runtime.register(self)

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
                else FAST_FAMILIES[event_family]
            )
        except (KeyError, TypeError):
            family = ""
        if (
            not family
            # x.__class__ rather than type(x): no global lookup and call, ~4% of track()
            or user_id.__class__ is not str
            or not user_id
            or event_name.__class__ is not str
            or not event_name
            or (context is not None and context.__class__ is not dict)
            or (item_id is not None and item_id.__class__ is not str)
            or (session_id is not None and session_id.__class__ is not str)
            or (recommendation_id is not None and recommendation_id.__class__ is not str)
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

    def _track_attributed(
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
        if recommendation_id is None and item_id is not None and type(user_id) is str:
            assert self._attribution is not None
            recommendation_id = self._attribution.lookup(user_id, item_id)
        Tracker.track(
            self,
            user_id,
            event_name,
            item_id=item_id,
            event_family=event_family,
            session_id=session_id,
            recommendation_id=recommendation_id,
            context=context,
        )

    def expose(
        self,
        user_id: str,
        recommendation: Recommendation,
        *,
        item_ids: Sequence[str] | None = None,
        session_id: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue one ``exposure`` event per item of ``recommendation`` that was shown.

        Each carries the ``recommendation_id`` and its ``position`` (0-based) in the
        answer in its context, merged over ``context``.

        Args:
            user_id: Who was shown the items.
            recommendation: What `recommend()` returned.
            item_ids: The items actually shown, if not all of them.
            session_id: The browsing session.
            context: Extra context for every exposure event (page, slot, ...).
        """
        shown = recommendation.all_item_ids if item_ids is None else item_ids
        position = {item: i for i, item in enumerate(recommendation.all_item_ids)}
        for item in shown:
            self.track(
                user_id,
                "exposure",
                event_family="exposure",
                item_id=item,
                session_id=session_id,
                recommendation_id=recommendation.recommendation_id,
                context={**(context or {}), "position": position.get(item)},
            )

    async def recommend(self, user_id: str, *, limit: int = 12, **params: Any) -> Recommendation:
        """Ask ``/recommend`` for items for ``user_id`` (one request, no retry).

        With ``attribution_ttl`` set, the answer's items are remembered for the user, so
        that later events about them carry its ``recommendation_id``.

        Args:
            user_id: The user to recommend for.
            limit: How many items to ask for.
            **params: Further documented request fields, sent as they are.

        Raises:
            InvalidEventError: ``user_id`` or ``limit`` is unusable.
            RecommendationError: no answer, a non-2xx answer, or an unreadable one.
        """
        if type(user_id) is not str or not user_id:
            raise InvalidEventError("user_id", "must be a non-empty str")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidEventError("limit", f"must be a positive int, got {limit!r}")
        body = msgspec.json.encode({**params, "user_id": user_id, "limit": limit})
        result = await self._on_own_loop(lambda: self._recommend(body))
        if self._attribution is not None:
            self._attribution.remember(user_id, result)
        return result

    async def _recommend(self, body: bytes) -> Recommendation:
        await self._transport.open()  # the flusher may not have opened it yet
        try:
            status, payload = await self._transport.call(self._recommend_url, body)
        except TransportFailure as exc:
            raise RecommendationError(f"/recommend did not answer: {exc}") from exc
        if not 200 <= status < 300:
            message = error_message(payload)
            raise RecommendationError(
                f"/recommend answered {status}: {message}", status=status, server_message=message
            )
        try:
            return recommendation_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise RecommendationError(f"/recommend answered something unreadable: {exc}") from exc

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

    async def atrack(
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
        """`track()` for producers that prefer backpressure: waits while the queue is full.

        Never drops for want of room; bound the wait with ``anyio.move_on_after()`` if
        needed. Raises as `track()` does.
        """
        if len(self._queue) >= self._config.max_queue_size:
            await self._on_own_loop(self._wait_for_room)
        self.track(
            user_id,
            event_name,
            item_id=item_id,
            event_family=event_family,
            session_id=session_id,
            recommendation_id=recommendation_id,
            context=context,
        )

    def _enqueue_slow(self, event: Event) -> None:
        """track()'s slow path: start, closed, full queue, or a batch is ready. Any thread."""
        if self._state is _State.NEW:
            self._ensure_started()
        state = self._state
        if state is _State.CLOSED or state is _State.CLOSING:
            with self._lock:
                self._ledger.discarded += 1
            self._report(
                ShutdownError("the tracker is closed; create a new Tracker to send more", [event])
            )
            return
        queue = self._queue
        if len(queue) >= self._config.max_queue_size:
            if self._config.overflow == "drop_newest":
                self._drop()
                return
            try:
                queue.popleft()
            except IndexError:  # emptied by the flusher meanwhile (another thread)
                pass
            else:
                self._drop()
        queue.append(event)
        if state is _State.RUNNING and len(queue) >= self._config.max_batch_size:
            self._threshold = self._config.max_queue_size
            self._wake_flusher()

    def _drop(self) -> None:
        with self._lock:
            self._ledger.dropped += 1
            self._ledger.discarded += 1
            self._drops_since_log += 1
            now = time.monotonic()
            if now - self._last_drop_log < _DROP_LOG_INTERVAL:
                return
            dropped, self._drops_since_log = self._drops_since_log, 0
            self._last_drop_log = now
        logger.warning(
            "queue full (max_queue_size=%d): dropped %d event(s) since the last warning, %d in all",
            self._config.max_queue_size,
            dropped,
            self._ledger.dropped,
        )

    def _wake_flusher(self) -> None:
        flusher, loop = self._flusher, self._loop
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
            self._adopt()
            self._ensure_started()

    # -- lifecycle ------------------------------------------------------------------------

    def _ensure_started(self, own_thread: bool = False) -> None:
        """Start the flusher if it is not running: on this thread's running loop, or, where
        no loop runs (or ``own_thread``), on a loop of the tracker's own in a background
        thread. Any thread."""
        with self._lock:
            if self._state is not _State.NEW:
                return
            try:
                if own_thread:
                    raise RuntimeError("use a thread of our own")
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._own_loop = LoopThread()
                self._loop = self._own_loop.loop
                self._state = _State.STARTING
                self._loop.call_soon_threadsafe(self._begin)
                return
            self._loop = loop
            self._begin()

    def _begin(self) -> None:
        """Start the flusher task; on the tracker's loop, its thread, with the loop running."""
        with self._lock:
            if self._state is not _State.NEW and self._state is not _State.STARTING:
                return
            loop = asyncio.get_running_loop()
            self._loop = loop
            self._loop_thread = threading.get_ident()
            self._flusher = flusher = Flusher(
                self._config,
                self._queue,
                self._ledger,
                self._transport,
                self._spool,
                self._replay_spool_at_start,
                self._report,
                self._reopen,
            )
            self._state = _State.RUNNING
            self._threshold = self._config.max_batch_size
            self._task = loop.create_task(self._run(flusher), name="lehnz_async flusher")
            if self._queue:
                flusher.wake.set()  # events tracked before the loop ran

    def _reopen(self) -> None:
        """The flusher drained: let track() wake it again when a batch is full."""
        if self._state is _State.RUNNING:
            self._threshold = self._config.max_batch_size

    async def _run(self, flusher: Flusher) -> None:
        try:
            await flusher.run()
        finally:
            with self._lock:
                if flusher.orphaned:
                    self._reset(keep_queue=True)
                    if self._queue:
                        # Carry on in a thread of our own now, while threads can still be
                        # started: Python 3.12+ refuses new threads once the interpreter
                        # is shutting down, when the exit hook runs.
                        logger.warning(
                            "the event loop stopped the tracker without aclose(); its %d "
                            "event(s) go on in a background thread (close the tracker, or "
                            "use asgi.lifespan, to flush on your own terms)",
                            len(self._queue),
                        )
                        self._ensure_started(own_thread=True)
                else:
                    self._state = _State.CLOSED
                    self._threshold = 0

    async def _on_own_loop(self, fn: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Await ``fn()`` run on the tracker's loop, from whichever loop the caller is on."""
        loop = self._serving_loop()
        if loop is asyncio.get_running_loop():
            return await fn()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(), loop))

    def _block_on_own_loop(
        self, fn: Callable[[], Coroutine[Any, Any, _T]], timeout: float | None
    ) -> _T:
        """Run ``fn()`` on the tracker's loop and block this thread until it is done.

        Raises:
            BlockingCallError: this thread runs the tracker's loop (it would deadlock).
            TimeoutError: not done within ``timeout`` seconds (then it is cancelled).
        """
        loop = self._serving_loop()
        if threading.get_ident() == self._loop_thread or _running_loop() is loop:
            raise BlockingCallError(
                "this blocking method was called on the event loop that runs the tracker, "
                "where it would wait forever; await the async form (flush(), aclose()) instead"
            )
        future = asyncio.run_coroutine_threadsafe(fn(), loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"not done within {timeout} s") from None

    def _serving_loop(self) -> asyncio.AbstractEventLoop:
        """The loop to run the tracker's coroutines on, started (or adopted) if need be.

        Raises:
            BlockingCallError: the tracker runs on a loop that exists but is not running.
        """
        if self._loop_stopped():
            assert self._loop is not None
            if not self._loop.is_closed():
                raise BlockingCallError(
                    "the tracker runs on an event loop that is not running now; call this "
                    "from that loop, or close the tracker there with `await tracker.aclose()`"
                )
            self._adopt()  # a closed loop never runs again
        self._ensure_started()
        assert self._loop is not None
        return self._loop

    async def start(self) -> None:
        """Start the background flusher now (track() also starts it, lazily).

        Raises:
            TrackerClosedError: the tracker was closed; closed trackers cannot restart.
        """
        if self._state is _State.CLOSING or self._state is _State.CLOSED:
            raise TrackerClosedError(
                "this Tracker was closed and cannot be restarted; create a new Tracker"
            )
        self._ensure_started()

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

    def __enter__(self) -> Tracker:
        self._ensure_started()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def flush(self) -> None:
        """Return once every event tracked before this call is delivered or reported.

        Partial batches are sent at once instead of waiting for ``flush_interval``.
        Wrap it in ``anyio.move_on_after()`` (or ``asyncio.timeout()``) to bound the wait.
        """
        if self._state is not _State.CLOSED:
            await self._on_own_loop(self._flush)

    def flush_sync(self, timeout: float | None = None) -> None:
        """The blocking form of `flush()`, for code that runs no event loop.

        Raises:
            TimeoutError: not everything settled within ``timeout`` seconds.
            BlockingCallError: called on the loop that runs the tracker.
        """
        if self._state is not _State.CLOSED:
            self._block_on_own_loop(self._flush, timeout)

    async def aclose(self, timeout: float | None = None) -> None:
        """Send what is queued, wait for it to settle, then release the HTTP session.

        Idempotent. Shielded from cancellation of the calling task, so that an app being
        cancelled still flushes, but bounded: after ``timeout`` seconds (default
        ``close_timeout``) what is still unsettled is spooled if there is a spool, else
        reported to ``on_error`` as `ShutdownError`.
        """
        if self._state is _State.CLOSED:
            return
        with anyio.CancelScope(shield=True):
            await self._on_own_loop(lambda: self._aclose(timeout))
        self._stop_own_loop()
        # everything is settled; now let a cancellation of the caller take its course
        await anyio.lowlevel.checkpoint_if_cancelled()

    def close(self, timeout: float | None = None) -> None:
        """The blocking form of `aclose()`, for code that runs no event loop.

        Raises:
            BlockingCallError: called on the loop that runs the tracker.
        """
        if self._state is _State.CLOSED:
            return
        self._block_on_own_loop(lambda: self._aclose(timeout), None)
        self._stop_own_loop()

    def _stop_own_loop(self) -> None:
        if self._own_loop is not None:
            self._own_loop.stop()
            self._own_loop = None

    async def _flush(self) -> None:
        if self._flusher is not None:
            await self._flusher.flush()

    async def _wait_for_room(self) -> None:
        if self._flusher is not None:
            await self._flusher.wait_for_room()

    async def _aclose(self, timeout: float | None) -> None:
        """aclose() on the tracker's loop."""
        flusher, task = self._flusher, self._task
        if flusher is None or task is None:  # closed meanwhile
            return
        if self._state is _State.RUNNING:
            self._state = _State.CLOSING
            self._threshold = 0
        deadline = self._config.close_timeout if timeout is None else timeout
        await flusher.close(deadline, task)

    # -- exit and fork --------------------------------------------------------------------

    def _exit_flush(self) -> None:
        """At interpreter exit: send what is left, within ``exit_timeout`` seconds."""
        if self._state is _State.CLOSED:
            return
        if self._loop_stopped():  # it will not run again: send from a loop of our own
            self._adopt()
        if self._state is _State.NEW and not self._queue:
            return
        logger.info(
            "sending %d event(s) left at exit (tracker never closed; exit_timeout=%.1f s)",
            len(self._queue) + self._ledger.in_flight,
            self._config.exit_timeout,
        )
        try:
            self.close(timeout=self._config.exit_timeout)
        except RuntimeError as exc:  # no thread can start at shutdown (Python 3.12+)
            self._fail_at_exit(str(exc))

    def _fail_at_exit(self, why: str) -> None:
        """Nothing can be sent any more: report what is left, never lose it silently."""
        leftovers = list(self._queue)
        self._queue.clear()
        if leftovers:
            with self._lock:
                self._ledger.discarded += len(leftovers)
            self._report(
                ShutdownError(
                    f"the interpreter exited with these events unsent and no way left to "
                    f"send them ({why}); close the tracker before exiting",
                    leftovers,
                )
            )
        self._state = _State.CLOSED

    def _reset_after_fork(self) -> None:
        """In a forked child: start empty; the parent sends what it had queued."""
        self._lock = threading.RLock()
        self._own_loop = None
        self._reset(keep_queue=False)
        self._replay_spool_at_start = False  # the parent's spool is the parent's to send

    def _loop_stopped(self) -> bool:
        """Whether the program's loop this tracker runs on is closed or not running."""
        loop = self._loop
        return (
            self._own_loop is None
            and loop is not None
            and (self._state is _State.RUNNING or self._state is _State.CLOSING)
            and (loop.is_closed() or not loop.is_running())
        )

    def _adopt(self) -> None:
        """Leave a loop that will never run again, keeping every event for the next one.

        Batches it had in flight go back to the front of the queue: at-least-once, so a
        batch whose answer was lost with the loop may be sent twice.
        """
        with self._lock:
            if self._flusher is not None:
                self._flusher.requeue_unsettled()
            self._reset(keep_queue=True)

    def _reset(self, keep_queue: bool) -> None:
        """Back to NEW, not bound to any loop (that loop is gone, or in another process)."""
        if not keep_queue:
            self._queue.clear()  # in a fork child: no other thread can be appending
            self._ledger = Ledger()
        self._state = _State.NEW
        self._threshold = 0
        self._loop = None
        self._loop_thread = 0
        self._task = None
        self._flusher = None
        self._transport.forget_session()

    # -- outcomes -------------------------------------------------------------------------

    def _report(self, error: DeliveryError) -> None:
        """Count ``error``'s events as failed, log the first of its kind, call on_error."""
        kind = (type(error), error.status)
        with self._lock:
            self._ledger.failed += len(error.events)
            seen = kind in self._reported_kinds
            self._reported_kinds.add(kind)
        if seen:
            level = logging.DEBUG
        elif isinstance(error, AuthenticationError):
            level = logging.ERROR  # every batch will fail alike: say it loudly, once
        else:
            level = logging.WARNING
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
            spooled=ledger.spooled,
            batches=ledger.batches,
            requests=ledger.requests,
            retries=ledger.retries,
        )

    @property
    def captured(self) -> list[Event]:
        """With ``capture=True``: the events "sent" so far, in order (flush() first).

        Raises:
            LehnzError: the tracker was not made with ``capture=True``.
        """
        if self._capture is None:
            raise LehnzError("captured is only kept by a Tracker(capture=True)")
        return list(self._capture.events)

    @property
    def closed(self) -> bool:
        """Whether `aclose()` has finished (or the flusher stopped)."""
        return self._state is _State.CLOSED

    def __repr__(self) -> str:
        return f"<Tracker {self._state.value} endpoint={self._config.endpoint!r} {self.stats}>"
