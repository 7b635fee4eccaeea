"""How a `Tracker` is made: its engine's parts, from the options (`Config`) and the seams
(`_seams`: transport, spool, random, clock), each part given what it uses as it is made;
and its stall watch. A mixin of `Tracker`."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._binding import LoopBinding
from ._buffer import Buffer
from ._config import DEFAULT_RECOMMEND_CONNECTIONS, Config
from ._flusher import Flusher
from ._health import Destination
from ._ledger import Ledger
from ._recommend import Attribution, Recommender, resolve_recommend_url
from ._seams import Seams
from ._spool import Spool
from ._transport import BatchTransport, CaptureTransport, Network, Transport
from ._watchdog import WATCHDOG, Watch, probe_of

if TYPE_CHECKING:
    from ._event import Event


class Assembly:
    """The making of a `Tracker` (whose attributes these are)."""

    _config: Config
    _ledger: Ledger
    _buffer: Buffer
    _events: Any
    _append: Callable[[Event], None]
    _capture: CaptureTransport | None
    _transport: BatchTransport
    _rng: random.Random
    _clock: Callable[[], float]
    _destination: Destination
    _recommender: Recommender
    _binding: LoopBinding
    _watch: Watch | None

    if TYPE_CHECKING:

        def _track_attributed(self, *args: Any, **kwargs: Any) -> None: ...

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
        self._watch = watch_of(self)

    def _make_flusher(self, replay_spool: bool) -> Flusher:
        if self._watch is not None:
            WATCHDOG.ensure_running()  # first run, or the first in a forked child
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


def watch_of(tracker: Assembly) -> Watch | None:
    """The tracker's stall watch, registered with the watchdog (None: turned off)."""
    timeout = tracker._config.stall_timeout
    if timeout is None:
        return None
    probe = probe_of(tracker._ledger, tracker._buffer, tracker._binding, tracker._destination)
    # events wait up to flush_interval in the queue by design: never call that a stall
    watch = Watch(max(timeout, 2 * tracker._config.flush_interval), tracker._ledger, probe)
    WATCHDOG.watch(watch)
    return watch
