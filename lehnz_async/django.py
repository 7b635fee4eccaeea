"""Django: one Tracker per process, ``request.lehnz`` in views, ``identify()`` at login, and
an ASGI wrapper that closes the tracker when an ASGI server shuts down.

settings.py::

    INSTALLED_APPS = [..., "lehnz_async.django.LehnzConfig"]
    MIDDLEWARE = [..., "lehnz_async.django.TrackerMiddleware"]  # after the auth middleware
    LEHNZ = {"flush_interval": 2.0}  # optional: Tracker(**LEHNZ); the key from LEHNZ_API_KEY

asgi.py (uvicorn, daphne, hypercorn: ASGI servers do not run exit hooks)::

    from django.core.asgi import get_asgi_application
    from lehnz_async.django import with_lifespan

    application = with_lifespan(get_asgi_application())

views::

    from lehnz_async.django import TrackedRequest, user_id

    def product(request: TrackedRequest, product_id: str) -> HttpResponse:
        request.lehnz.track(user_id(request), "view", item_id=product_id)

- The tracker is made when the app registry is ready, from ``settings.LEHNZ``, and
  started in each process where it is first used (``request.lehnz``, `get_tracker`), on
  a loop thread of its own: sync views, ``async def`` views (under WSGI each runs on a
  short-lived loop) and other threads share it. After a fork (gunicorn ``--preload``)
  each worker starts its own copy, empty. Reach it through ``request.lehnz`` or
  `get_tracker` each time rather than keeping it from import time.
- Under WSGI servers (gunicorn, uWSGI, ``runserver``) the package's exit hook sends what
  is left when a worker exits (``--max-requests`` recycling, SIGTERM), within the
  tracker's ``exit_timeout``. ASGI servers end without running exit hooks, and Django's
  ASGI handler has no lifespan: `with_lifespan` answers the lifespan protocol and closes
  the tracker at shutdown, within its ``close_timeout``.
- Identity: `user_id` is the signed-in user's primary key, or else an anonymous id kept in
  the session; at login (Django's ``user_logged_in`` signal) that anonymous id is merged
  into the account with ``identify()`` and removed from the session.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.apps import AppConfig
from django.conf import settings
from django.contrib.auth.signals import user_logged_in
from django.http import HttpRequest, HttpResponseBase

from ._per_process import ProcessTracker
from ._tracker import Tracker

__all__ = [
    "SESSION_KEY",
    "LehnzConfig",
    "TrackedRequest",
    "TrackerMiddleware",
    "auser_id",
    "get_tracker",
    "user_id",
    "with_lifespan",
]

#: The session key of the anonymous id `user_id` keeps for visitors not signed in.
SESSION_KEY = "lehnz_anon_id"

Scope = dict[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _from_settings() -> Tracker:
    return Tracker(**getattr(settings, "LEHNZ", {}))


_process = ProcessTracker(_from_settings)


def get_tracker() -> Tracker:
    """This process's tracker (made from ``settings.LEHNZ`` if need be), started."""
    return _process.get()


class LehnzConfig(AppConfig):
    """Makes the tracker when Django is ready (a bad key fails the start); identifies
    users at login."""

    name = "lehnz_async.django"
    label = "lehnz_async"
    verbose_name = "Lehnz event tracking"

    def ready(self) -> None:
        # Make it now, to fail at startup on a bad key or option, but start it only where
        # it is first used: the master process of a pre-forking server (gunicorn
        # --preload) must not fork with the tracker's thread running.
        _process.make()
        user_logged_in.connect(_identify_at_login, dispatch_uid="lehnz_async.identify")


class TrackedRequest(HttpRequest):
    """For type annotations only: a request that went through `TrackerMiddleware`
    (``def view(request: TrackedRequest)``); Django's own ``HttpRequest`` at run time."""

    lehnz: Tracker


class TrackerMiddleware:
    """Sets ``request.lehnz`` to the process's tracker, in sync and async stacks alike."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        request.lehnz = _process.get()  # type: ignore[attr-defined]
        return self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        request.lehnz = _process.get()  # type: ignore[attr-defined]
        response: HttpResponseBase = await self.get_response(request)
        return response


def user_id(request: HttpRequest) -> str:
    """The id to track ``request``'s events under: ``str(user.pk)`` when signed in, else
    an anonymous ``anon_...`` id kept in the session (made on the first call).

    Sync code only (it may read the session store); in ``async def`` views use
    `auser_id`.
    """
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return str(user.pk)
    anon = request.session.get(SESSION_KEY)
    if not isinstance(anon, str) or not anon:
        anon = request.session[SESSION_KEY] = "anon_" + secrets.token_hex(16)
    return anon


async def auser_id(request: HttpRequest) -> str:
    """`user_id` for ``async def`` views."""
    found: str = await sync_to_async(user_id)(request)
    return found


def _identify_at_login(
    sender: object, request: HttpRequest | None = None, user: Any = None, **_: object
) -> None:
    """``user_logged_in``: merge the session's anonymous history into the account."""
    if request is None or user is None or not hasattr(request, "session"):
        return
    anon = request.session.pop(SESSION_KEY, None)  # login() keeps the session's data
    if isinstance(anon, str) and anon:
        _process.get().identify(str(user.pk), previous_user_id=anon)


def with_lifespan(app: ASGIApp, *, close_timeout: float | None = None) -> ASGIApp:
    """Wrap Django's ASGI application to answer the ASGI lifespan protocol.

    At startup the tracker is made and started (a bad key fails the startup); at
    shutdown it sends what is queued and closes, within ``close_timeout`` seconds (the
    tracker's own ``close_timeout`` if None). Every other scope goes to ``app``.
    """

    async def application(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    _process.get()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await _process.aclose(close_timeout)
                except Exception as exc:
                    await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    return application
