"""Celery: a tracker in each worker process, closed before the process ends.

Usage (in the module that makes the Celery app)::

    from celery import Celery
    from lehnz_async import Tracker
    from lehnz_async.celery import get_tracker, setup

    app = Celery("shop", broker="redis://127.0.0.1:6379/0")
    setup(Tracker)  # or setup(Tracker(flush_interval=2.0)), or a function making one


    @app.task
    def order_placed(user: str, item: str) -> None:
        get_tracker().track(user, "purchase", item_id=item)

Celery's prefork pool (billiard) ends its child processes with ``os._exit()``, which
skips every exit hook, also when it recycles them (``--max-tasks-per-child``,
``--max-memory-per-child``): without this module, the events a child still holds when it
ends are lost. `setup` hooks Celery's own signals:

- ``worker_process_init`` (in each new pool process): start the tracker there. Its copy
  inherited from the parent starts empty (the parent sends what it had queued).
- ``worker_process_shutdown`` (in a pool process about to end, recycled or at the
  worker's shutdown): send what it holds and close it, within ``shutdown_timeout``
  seconds; what cannot be sent by then is reported to ``on_error`` as ``ShutdownError``
  (or spooled, with ``spool_path``), never lost silently.
- ``worker_shutdown`` (in the main process, on warm shutdown: SIGTERM, SIGINT): the
  same, for the ``solo`` and ``threads`` pools, whose tasks run in the main process.

A pool process killed outright (SIGKILL, a hard time limit, the out-of-memory killer)
runs no code at all: what it held is lost, unless ``spool_path`` is set and
``max_event_age``/outages made it spool first.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import signals

from ._exceptions import ConfigurationError
from ._per_process import ProcessTracker
from ._tracker import Tracker

__all__ = ["DEFAULT_SHUTDOWN_TIMEOUT", "get_tracker", "setup"]

#: Seconds a pool process (or the main process) may spend closing its tracker as it ends.
DEFAULT_SHUTDOWN_TIMEOUT = 5.0

_process: ProcessTracker | None = None
_shutdown_timeout = DEFAULT_SHUTDOWN_TIMEOUT


def setup(
    tracker: Tracker | Callable[[], Tracker] = Tracker,
    *,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> None:
    """Run ``tracker`` in every worker process and close it before each one ends.

    Call it once, where the Celery app is made (the worker imports that module before it
    forks its pool). Calling it again replaces the tracker, for processes that start
    afterwards.

    Args:
        tracker: A `Tracker` (each process uses its own copy of it), or a function that
            makes one, called once, when the tracker is first needed.
        shutdown_timeout: Most seconds a process spends closing the tracker as it ends;
            keep it below the time your platform gives the worker to stop.
    """
    global _process, _shutdown_timeout
    if not shutdown_timeout > 0:
        raise ConfigurationError(f"shutdown_timeout must be > 0, not {shutdown_timeout!r}")
    _process = ProcessTracker(tracker)
    _shutdown_timeout = shutdown_timeout
    signals.worker_process_init.connect(_on_process_init, weak=False, dispatch_uid=__name__)
    signals.worker_process_shutdown.connect(_on_shutdown, weak=False, dispatch_uid=__name__)
    signals.worker_shutdown.connect(_on_shutdown, weak=False, dispatch_uid=__name__)


def get_tracker() -> Tracker:
    """This process's tracker, started.

    Raises:
        ConfigurationError: `setup` was not called.
    """
    if _process is None:
        raise ConfigurationError("call lehnz_async.celery.setup() where the Celery app is made")
    return _process.get()


def _on_process_init(**_: object) -> None:
    if _process is not None:
        _process.get()


def _on_shutdown(**_: object) -> None:
    if _process is not None:
        _process.close(_shutdown_timeout)
