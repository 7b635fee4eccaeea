"""The public `Tracker`: the facade over buffer → flusher → sender → transport.

It holds the options and the hot path; three mixins hold the rest: how it is made
(`_assembly`), its life after ``track()`` (`_lifecycle`: start, mark, flush, close,
health) and recommendations (`_recommending`). The ledger (`_ledger`) settles every event.
A closed tracker (``aclose()`` or ``close()`` has begun): ``start()`` and ``recommend()``
raise `TrackerClosedError`; ``track()``, ``identify()``, ``expose()`` and ``atrack()``
report their events as `ShutdownError` (never raising into a request path); ``flush()``
returns at once; ``aclose()`` and ``close()`` do nothing more; no session is opened.
"""

from __future__ import annotations

import difflib
import inspect
import os
import random
import ssl as ssl_module
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import aiohttp

from ._assembly import Assembly
from ._binding import State
from ._config import (
    DEFAULT_ATTRIBUTION_MAX_USERS,
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_EXIT_TIMEOUT,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BUFFER_BYTES,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_EVENT_AGE,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_MAX_SPOOL_BYTES,
    DEFAULT_OUTAGE_GRACE,
    DEFAULT_OVERFLOW,
    DEFAULT_PROBE_MAX_DELAY,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_STALL_TIMEOUT,
    Config,
    OnError,
)
from ._event import FAST_FAMILIES, STANDARD_FAMILIES, Event, build_event
from ._exceptions import (
    ConfigurationError,
    InvalidEventError,
    LehnzError,
    ShutdownError,
    TrackerClosedError,
)
from ._lifecycle import Lifecycle
from ._recommending import Recommending
from ._retry import RetryPolicy
from ._seams import Seams, loop_clock
from ._spool import Spool
from ._stats import Stats
from ._transport import BatchTransport

_CLOSED = "the tracker is closed; create a new Tracker to send more"


class Tracker(Assembly, Lifecycle, Recommending):
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
        max_buffer_bytes: Most bytes the queued and in-flight events may hold in memory
            (reckoned from their encoded size); beyond it, the overflow policy drops.
        retry: How retryable failures are retried (`RetryPolicy`: attempts, time,
            backoff).
        close_timeout: Default deadline of `aclose()`, in seconds.
        exit_timeout: Deadline of the exit hook that sends what a tracker that was never
            closed still holds when the interpreter exits.
        overflow: What `track()` does with a full queue: ``"drop_newest"`` (the event
            being tracked) or ``"drop_oldest"`` (the longest waiting). `atrack()` waits
            for room instead.
        spool_path: A SQLite file for batches not delivered in time (retries ran out on
            a retryable failure, or the close deadline passed); they are re-sent, oldest
            first, when a tracker with the same ``spool_path`` next starts.
        max_spool_bytes: Most bytes of batch bodies the spool file may hold.
        max_event_age: Seconds after which an event still unsent is dropped (counted);
            None (the default) keeps events while the byte budget holds them.
        outage_grace: Seconds a streak of retryable failures may last before the tracker
            treats the endpoint as down (outage mode: hold events, probe, no batch gives
            up); None turns outage mode off.
        probe_max_delay: Most seconds between two probes during an outage.
        stall_timeout: Seconds after which a tracker whose oldest event has waited that
            long, with nothing delivered for as long, is *stalled*: logged once at ERROR
            with what it sees, and ``down`` in `health()`. None turns the watchdog off.
        session: An `aiohttp.ClientSession` to use instead of the tracker's own; the
            tracker never closes it.
        proxy: An HTTP proxy URL for every request (``http://proxy:3128``).
        trust_env: Honour ``HTTP_PROXY``, ``HTTPS_PROXY`` and ``NO_PROXY`` (default).
        ssl: An `ssl.SSLContext` (a private CA, client certificates); certificates are
            always verified unless the context itself turns it off. A certificate that
            does not verify is reported at once, never retried.
        compression: ``"gzip"`` compresses request bodies (off by default: the
            documented contract does not say the service accepts it).
        before_send: Called with each `Event` before it is encoded, in the flusher (never
            in track()): return it (edited or replaced) to send it, or None to drop it
            (counted, reason ``before_send``). If it raises, the event is not sent and is
            reported to ``on_error`` with the exception as the cause.
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
        ConfigurationError: a missing, secret or malformed key, an unusable option, or
            one that does not exist (with the closest that does).
    """

    def __new__(cls, *args: Any, **options: Any) -> Tracker:
        # Python's own TypeError for a misspelt option names no alternative: say which
        # option was meant, as a ConfigurationError, before __init__ would be called
        unknown = options.keys() - _OPTIONS
        if unknown:
            name = sorted(unknown)[0]
            close = difflib.get_close_matches(name, _OPTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (see the README's options table)"
            raise ConfigurationError(f"Tracker() has no option {name!r}{hint}")
        return super().__new__(cls)

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
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        retry: RetryPolicy | None = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        exit_timeout: float = DEFAULT_EXIT_TIMEOUT,
        overflow: str = DEFAULT_OVERFLOW,
        spool_path: str | os.PathLike[str] | None = None,
        max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES,
        max_event_age: float | None = DEFAULT_MAX_EVENT_AGE,
        outage_grace: float | None = DEFAULT_OUTAGE_GRACE,
        probe_max_delay: float = DEFAULT_PROBE_MAX_DELAY,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        session: aiohttp.ClientSession | None = None,
        proxy: str | None = None,
        trust_env: bool = True,
        ssl: ssl_module.SSLContext | None = None,
        compression: str | None = None,
        before_send: Callable[[Event], Event | None] | None = None,
        capture: bool = False,
        recommend_endpoint: str | None = None,
        attribution_ttl: float | None = None,
        attribution_max_users: int = DEFAULT_ATTRIBUTION_MAX_USERS,
    ) -> None:
        # Config declares every option, with its checks: it takes the arguments as given
        options = dict(locals())
        del options["self"]
        self._assemble(Config(**options), Seams())

    @classmethod
    def _from_seams(cls, seams: Seams, **options: Any) -> Tracker:
        """A tracker whose engine is made with ``seams`` (`_seams`), given the options of
        `Tracker()` by name, checked as there. Not public API."""
        tracker = cls.__new__(cls, **options)  # refuses an option that does not exist
        tracker._assemble(Config(**options), seams)
        return tracker

    @classmethod
    def _simulated(
        cls,
        transport: BatchTransport,
        *,
        rng: random.Random,
        spool: Spool | None = None,
        **options: Any,
    ) -> Tracker:
        """A tracker for the deterministic simulation: an in-memory transport (which
        answers recommend() too) and spool (`lehnz_async.testing.MemorySpool`), seeded
        jitter, the running loop's (virtual) time as its clock, and a run that lost its
        loop resumes on the next loop that calls in (never in a thread of its own). Not
        public API."""
        options.setdefault("stall_timeout", None)  # a real-time watchdog: not on virtual time
        seams = Seams(transport, spool, rng, loop_clock, resume_in_thread=False)
        return cls._from_seams(seams, api_key="lehnz_pk_simulation", **options)

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
        ``context`` is serialized after the call, at the latest when its batch is sent:
        do not mutate it afterwards.
        After close, the event is reported to ``on_error`` as `ShutdownError`.

        Raises:
            InvalidEventError: an empty or missing ``user_id``/``event_name``, an
                ``event_family`` outside the four, a custom name without a family, the
                name ``identify`` (use `identify()`), a ``context`` that is not a
                mapping, or an id that is not a str.
        """
        try:
            family = (
                STANDARD_FAMILIES[event_name]
                if event_family is None
                # a standard name is never "identify"; a custom one with a family may be
                else FAST_FAMILIES[event_family]
                if event_name != "identify"
                else ""
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
        if len(self._events) < self._buffer.threshold:
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
        if recommendation_id is None and item_id.__class__ is str and user_id.__class__ is str:
            attribution = self._recommender.attribution
            assert attribution is not None and item_id is not None
            recommendation_id = attribution.lookup(user_id, item_id)
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

    def _enqueue_slow(self, event: Event) -> None:
        """track()'s slow path: start, closed, full queue, or a batch is ready. Any thread."""
        binding = self._binding
        if binding.state is State.NEW:
            binding.ensure_started()
        if binding.closing:
            self._ledger.refuse(ShutdownError(_CLOSED, [event]))
            return
        self._buffer.put(event, running=binding.state is State.RUNNING)

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
        attribution = self._recommender.attribution
        if attribution is not None:  # what the anonymous id was shown follows the user
            attribution.merge(event.previous_user_id or "", event.user_id)
        if len(self._events) < self._buffer.threshold:
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
        """`track()` for producers that prefer backpressure: waits while the buffer is full
        (``max_queue_size``, or the ``max_buffer_bytes`` budget).

        Never drops for want of room; bound the wait with ``anyio.move_on_after()`` if
        needed. Raises as `track()` does.
        """
        binding = self._binding
        if len(self._events) >= self._buffer.limit() and not binding.closing:
            await binding.on_loop(binding.wait_for_room)
        self.track(
            user_id,
            event_name,
            item_id=item_id,
            event_family=event_family,
            session_id=session_id,
            recommendation_id=recommendation_id,
            context=context,
        )

    # -- lifecycle ------------------------------------------------------------------------

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
        if self._binding.closing:
            raise TrackerClosedError(
                "this Tracker was closed and cannot be restarted; create a new Tracker"
            )
        self._binding.ensure_started()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters (see `Stats`); it adds up, from any thread."""
        buffer = self._buffer
        return self._ledger.stats(buffer.queued, buffer.queued_bytes)

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
        return self._binding.state is State.CLOSED

    def __repr__(self) -> str:
        return (
            f"<Tracker {self._binding.state.value} endpoint={self._config.endpoint!r} {self.stats}>"
        )


# help(Tracker), IDEs and the API reference show __init__'s options, not __new__'s
# catch-all; __new__ checks a call's keywords against them
_init = inspect.signature(Tracker.__init__)
_SIGNATURE = _init.replace(parameters=[p for p in _init.parameters.values() if p.name != "self"])
setattr(Tracker, "__signature__", _SIGNATURE)  # noqa: B010  (mypy does not know it)
_OPTIONS = frozenset(_SIGNATURE.parameters)
