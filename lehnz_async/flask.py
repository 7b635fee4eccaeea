"""Flask: a `Lehnz` extension, with the application factory pattern.

Usage::

    from flask import Flask
    from lehnz_async.flask import Lehnz

    lehnz = Lehnz()


    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["LEHNZ"] = {"flush_interval": 2.0}  # optional: Tracker(**LEHNZ)
        lehnz.init_app(app)

        @app.post("/cart/<product_id>")
        def add_to_cart(product_id: str) -> dict[str, str]:
            lehnz.tracker.track(lehnz.user_id(), "add_to_cart", item_id=product_id)
            return {"added": product_id}

        return app

- `init_app` makes the app's tracker (from ``app.config["LEHNZ"]``, the key from
  ``LEHNZ_API_KEY``); `Lehnz.tracker` starts it in each process where it is first used,
  on a loop thread of its own, so plain views, ``async def`` views (Flask runs each on a
  short-lived loop) and threads share it. After a fork (gunicorn ``--preload``) each
  worker starts its own copy, empty.
- WSGI servers run the package's exit hook when a worker exits (gunicorn
  ``--max-requests`` recycling, SIGTERM): what is left is sent within the tracker's
  ``exit_timeout``. `close` closes it earlier, e.g. from gunicorn's ``worker_exit`` hook.
- `user_id` tracks visitors under an anonymous id kept in Flask's ``session`` until
  `login` merges it into their account with ``identify()``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from flask import Flask, current_app, session

from ._exceptions import ConfigurationError
from ._per_process import ProcessTracker
from ._tracker import Tracker

__all__ = ["EXTENSION_KEY", "SESSION_KEY", "Lehnz"]

#: The app's `ProcessTracker` in ``app.extensions``.
EXTENSION_KEY = "lehnz"
#: The session key of the anonymous id `Lehnz.user_id` keeps.
SESSION_KEY = "lehnz_anon_id"


class Lehnz:
    """The Flask extension: a tracker per app and per process, flushed at worker exit.

    Args:
        app: An app to set up now (otherwise call `init_app` from your factory).
        tracker: A `Tracker`, or a function that makes one; by default
            ``Tracker(**app.config.get("LEHNZ", {}))``.
    """

    def __init__(
        self, app: Flask | None = None, *, tracker: Tracker | Callable[[], Tracker] | None = None
    ) -> None:
        self._tracker = tracker
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Make the app's tracker now (a bad key or option fails here); it starts where it
        is first used (a process that forks must not have its thread running)."""
        make = self._tracker
        if make is None:
            options = dict(app.config.get("LEHNZ", {}))
            make = lambda: Tracker(**options)  # noqa: E731
        holder = ProcessTracker(make)
        holder.make()
        app.extensions[EXTENSION_KEY] = holder

    @property
    def tracker(self) -> Tracker:
        """The current app's tracker, started in this process.

        Raises:
            ConfigurationError: the current app was not set up with `init_app`.
        """
        return _holder().get()

    def close(self, timeout: float | None = None) -> None:
        """Send what the current app's tracker holds and close it (``close_timeout``
        seconds at most by default)."""
        _holder().close(timeout)

    def user_id(self) -> str:
        """The anonymous id of this visitor, kept in ``flask.session`` (made at the first
        call; the app needs a ``SECRET_KEY``). Track under your account id once signed in.
        """
        anon = session.get(SESSION_KEY)
        if not isinstance(anon, str) or not anon:
            anon = session[SESSION_KEY] = "anon_" + secrets.token_hex(16)
        return anon

    def login(self, account_id: str) -> None:
        """Call at sign-in: merge this session's anonymous history into ``account_id``
        (``identify()``) and forget the anonymous id."""
        anon = session.pop(SESSION_KEY, None)
        if isinstance(anon, str) and anon:
            self.tracker.identify(account_id, previous_user_id=anon)


def _holder() -> ProcessTracker:
    holder = current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(holder, ProcessTracker):
        raise ConfigurationError("this Flask app was not set up: call Lehnz().init_app(app)")
    return holder
