"""Reports: what a tracker tells its user, through ``on_error`` and the log.

The ledger's failure reports (`Reporting.report`), the bugs it survives
(`Reporting.internal_error`) and slow hooks (`Reporting.slow_hook`), and the messages of
events given up at close. A mixin of `Ledger`, apart from its counters: each report is
logged once per kind at WARNING or ERROR and later ones at DEBUG, so a failure that
repeats never floods a log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._event import thaw
from ._exceptions import AuthenticationError, DeliveryError, ShutdownError

if TYPE_CHECKING:
    from ._batch import Batch

logger = logging.getLogger("lehnz_async")


class Reporting:
    """The reporting half of `Ledger` (which sets these attributes)."""

    _lock: threading.Lock
    _on_error: Callable[[DeliveryError], object] | None
    _in_on_error: threading.local
    _reported_kinds: set[tuple[type, int | None]]
    _internal_logged: set[tuple[str, type]]
    _slow_hooks: set[str]
    endpoint: str
    internal_errors: int
    last_loss: tuple[float, str] | None
    hook_running: str

    def internal_error(self, where: str, exc: Exception) -> None:
        """A bug caught in ``where``: counted, logged once (with its traceback) for each
        place and kind of exception, later ones at DEBUG."""
        kind = (where, type(exc))
        with self._lock:
            self.internal_errors += 1
            seen = kind in self._internal_logged
            self._internal_logged.add(kind)
        logger.log(
            logging.DEBUG if seen else logging.ERROR,
            "internal error in the %s: %s: %s; the batches in hand are failed, and it goes on",
            where,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )

    def report(self, error: DeliveryError) -> None:
        """Log the first failure of its kind at WARNING (a refused key at ERROR), later ones
        at DEBUG, and hand ``error`` to on_error (what that raises is logged)."""
        if self.endpoint and error.endpoint is None:
            error.endpoint = self.endpoint
        kind = (type(error), error.status)
        with self._lock:
            self.last_loss = (time.monotonic(), f"{len(error.events)} failed ({error})")
            seen = kind in self._reported_kinds
            self._reported_kinds.add(kind)
        if seen:
            level = logging.DEBUG
        elif isinstance(error, AuthenticationError) or error.__cause__ is not None:
            level = logging.ERROR  # every batch will fail alike, or a bug: say it loudly
        else:
            level = logging.WARNING
        logger.log(level, "%d event(s) not delivered: %s", len(error.events), error)
        if self._on_error is None:
            return
        local = self._in_on_error
        if getattr(local, "active", False):  # on_error led here (it tracked after close)
            logger.warning(
                "%d event(s) failed while on_error ran (%s): not passed to on_error again",
                len(error.events),
                error,
            )
            return
        thaw(error.events)
        local.active = True
        started = time.perf_counter()
        self.hook_running = "on_error"
        try:
            self._on_error(error)
        except Exception:
            logger.exception("on_error raised; the error it was given is logged above")
        finally:
            local.active = False
            self.hook_running = ""
        self.slow_hook("on_error", time.perf_counter() - started)

    def slow_hook(self, name: str, seconds: float) -> None:
        """Log, once per hook, a call of ``name`` that took ``seconds`` if that is over
        `SLOW_HOOK`: a hook runs on the tracker's loop, and holds every delivery."""
        if seconds > SLOW_HOOK and name not in self._slow_hooks:
            self._slow_hooks.add(name)
            _log_slow_hook(name, seconds)


#: The message of events still unsettled when the close deadline passed.
UNSENT_AT_CLOSE = (
    "the close deadline passed before these events were acknowledged "
    "(they may or may not have reached the server)"
)

NEVER_SENT_AT_CLOSE = (
    "the close deadline passed before these events could be sent (no attempt reached the server)"
)

#: Seconds a before_send or on_error call may take before it is logged (once) as slow.
SLOW_HOOK = 0.1


def _log_slow_hook(name: str, seconds: float) -> None:
    logger.warning(
        "%s took %.3f s (more than %.1f s): it runs on the tracker's event loop and "
        "holds every delivery meanwhile; keep it fast",
        name,
        seconds,
        SLOW_HOOK,
    )


#: The message of events still unsettled at the close deadline that were never sent.


def close_deadline_error(batch: Batch, outage: str = "") -> ShutdownError:
    """The error of ``batch``, unsettled at the close deadline: whether it may have
    reached the server depends on how its attempts ended; why it was not delivered
    sooner is its last attempt's failure, or ``outage``'s cause (the endpoint was down)."""
    message = UNSENT_AT_CLOSE if batch.maybe_sent else NEVER_SENT_AT_CLOSE
    if outage:
        message = f"{message}; the endpoint was down: {outage}"
    elif batch.last_failure:
        message = f"{message}; its last attempt: {batch.last_failure}"
    return ShutdownError(message, batch.events)
