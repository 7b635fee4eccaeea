"""The public `Tracker`: the facade over buffer → flusher → sender → transport.

It holds the public methods and the hot path, and little else: the loop binding
(`_binding`) runs the engine, the ledger (`_ledger`) settles every event, the recommender
(`_recommend`) answers ``recommend()``. One rule for a closed tracker (``aclose()`` or
``close()`` has begun): ``start()`` and ``recommend()`` raise `TrackerClosedError`;
``track()``, ``identify()``, ``expose()`` and ``atrack()`` report their events to
``on_error`` as `ShutdownError` (they never raise into a request path); ``flush()`` and
``flush_sync()`` return at once; ``aclose()`` and ``close()`` do nothing more; no session
is opened.
"""

from __future__ import annotations

import difflib
import inspect
import os
import random
import ssl as ssl_module
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp
import anyio
import msgspec

from ._binding import LoopBinding, State
from ._buffer import Buffer
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
    DEFAULT_RECOMMEND_CONNECTIONS,
    DEFAULT_REQUEST_TIMEOUT,
    Config,
    OnError,
    positive_float,
)
from ._event import FAST_FAMILIES, STANDARD_FAMILIES, Event, build_event
from ._exceptions import (
    ConfigurationError,
    InvalidEventError,
    LehnzError,
    ShutdownError,
    TrackerClosedError,
)
from ._flusher import Flusher
from ._health import Destination
from ._ledger import Ledger
from ._recommend import (
    Attribution,
    Recommendation,
    Recommender,
    resolve_recommend_url,
)
from ._retry import RetryPolicy
from ._seams import Seams, loop_clock
from ._spool import Spool
from ._stats import Stats
from ._transport import BatchTransport, CaptureTransport, Network, Transport

_CLOSED = "the tracker is closed; create a new Tracker to send more"


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

    def _assemble(self, config: Config, seams: Seams) -> None:
        """Make the engine's parts from the options and the seams (`_seams`), each part
        given, as it is made, the seams it uses."""
        self._config = config
        spool = seams.spool
        if spool is None and config.spool_path is not None:
            spool = Spool(config.spool_path)
        self._ledger = ledger = Ledger(config.on_error, spool)
        ledger.endpoint = "capture" if config.capture else config.endpoint
        self._buffer = buffer = Buffer(config, ledger)
        # the hot path's handles on the buffer (the same deque for the tracker's life)
        self._events = buffer.events
        self._append = buffer.append
        self._capture = CaptureTransport() if config.capture else None
        given = seams.transport or self._capture  # serves recommend() too
        network = Network(config.proxy, config.trust_env, config.ssl, config.compression)
        self._transport: BatchTransport = given or Transport(
            config.endpoint,
            config.api_key,
            config.request_timeout,
            config.max_concurrent_requests,
            config.session,
            network,
        )
        self._rng = seams.rng
        self._clock = seams.clock
        self._destination = Destination(config.outage_grace, config.probe_max_delay, ledger)
        attribution = None
        if config.attribution_ttl is not None:
            attribution = Attribution(
                config.attribution_ttl, config.attribution_max_users, seams.clock
            )
            # attribution only costs the trackers that turn it on: the plain track()
            # stays as it is, this instance's is a wrapper that fills recommendation_id
            setattr(self, "track", self._track_attributed)  # noqa: B010
        self._recommender = Recommender(
            resolve_recommend_url(config.recommend_endpoint, config.endpoint),
            given
            or Transport(
                config.endpoint,
                config.api_key,
                config.request_timeout,
                DEFAULT_RECOMMEND_CONNECTIONS,
                config.session,
                Network(config.proxy, config.trust_env, config.ssl),  # answers: no gzip
            ),
            attribution,
        )
        self._binding = LoopBinding(
            buffer,
            ledger,
            self._make_flusher,
            self._forget_sessions,
            self._recommender.transport.close,
            config.exit_timeout,
            seams.clock,
            seams.resume_in_thread,
        )

    def _make_flusher(self, replay_spool: bool) -> Flusher:
        return Flusher(
            self._config,
            self._buffer,
            self._ledger,
            self._transport,
            self._rng,
            replay_spool,
            self._destination,
            self._clock,
        )

    def _forget_sessions(self) -> None:
        self._transport.forget_session()
        self._recommender.transport.forget_session()

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
        ``context`` is serialized when its batch is sent: do not mutate it afterwards.
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

        It goes over a connection pool of its own, so batches in flight never delay it.
        With ``attribution_ttl`` set, the answer's items are remembered for the user, so
        that later events about them carry its ``recommendation_id``.

        Args:
            user_id: The user to recommend for.
            limit: How many items to ask for.
            **params: Further documented request fields, sent as they are.

        Raises:
            InvalidEventError: ``user_id`` or ``limit`` is unusable.
            TrackerClosedError: the tracker was closed.
            RecommendationError: no answer, a non-2xx answer, or an unreadable one.
        """
        if self._binding.closing:
            raise TrackerClosedError("recommend() on a closed Tracker; create a new Tracker")
        if type(user_id) is not str or not user_id:
            raise InvalidEventError("user_id", "must be a non-empty str")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidEventError("limit", f"must be a positive int, got {limit!r}")
        body = msgspec.json.encode({**params, "user_id": user_id, "limit": limit})
        recommender = self._recommender
        return await self._binding.on_loop(lambda: recommender.recommend(user_id, body))

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background flusher now (track() also starts it, lazily).

        Raises:
            TrackerClosedError: the tracker was closed; closed trackers cannot restart.
        """
        if self._binding.closing:
            raise TrackerClosedError(
                "this Tracker was closed and cannot be restarted; create a new Tracker"
            )
        self._binding.ensure_started()

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

    async def flush(self, timeout: float | None = None) -> None:
        """Return once every event tracked before this call is delivered or reported.

        Partial batches are sent at once instead of waiting for ``flush_interval``.
        During an outage nothing gives up, so without a ``timeout`` this waits until the
        endpoint is back. Returns at once on a closed tracker (its close settled
        everything).

        Raises:
            TimeoutError: not everything settled within ``timeout`` seconds (the events
                stay queued and in flight: nothing is given up).
        """
        binding = self._binding
        if binding.closing:
            return
        if timeout is None:
            await binding.on_loop(binding.flush)
            return
        positive_float("timeout", timeout)
        try:
            with anyio.fail_after(timeout):
                await binding.on_loop(binding.flush)
        except TimeoutError:
            raise TimeoutError(
                f"flush() did not settle everything within {timeout} s ({self.stats})"
            ) from None

    def flush_sync(self, timeout: float | None = None) -> None:
        """The blocking form of `flush()`, for code that runs no event loop.

        Raises:
            TimeoutError: not everything settled within ``timeout`` seconds.
            BlockingCallError: called on the loop that runs the tracker.
        """
        binding = self._binding
        if not binding.closing:
            binding.block_on_loop(binding.flush, timeout)

    async def aclose(self, timeout: float | None = None) -> None:
        """Send what is queued, wait for it to settle, then release the HTTP sessions.

        Idempotent. The close runs to its deadline (``timeout``, default
        ``close_timeout``) whatever cancels the caller meanwhile (asyncio's
        ``wait_for``, ``timeout``, a TaskGroup, ``Task.cancel()``, or an anyio cancel
        scope); then the cancellation is delivered. At the deadline, what is still
        unsettled is spooled if there is a spool, else reported to ``on_error`` as
        `ShutdownError`. A second asyncio cancellation brings the deadline forward to
        now: what is unsettled is spooled or reported at once.
        """
        if self._binding.state is not State.CLOSED:
            await self._binding.aclose(self._close_timeout(timeout))

    def close(self, timeout: float | None = None) -> None:
        """The blocking form of `aclose()`, for code that runs no event loop.

        Raises:
            BlockingCallError: called on the loop that runs the tracker.
        """
        if self._binding.state is not State.CLOSED:
            self._binding.close_blocking(self._close_timeout(timeout))

    def _close_timeout(self, timeout: float | None) -> float:
        return self._config.close_timeout if timeout is None else timeout

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
