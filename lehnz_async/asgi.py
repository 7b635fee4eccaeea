"""Starlette and FastAPI: tie a `Tracker` to an app's lifespan and reach it from endpoints.

Usage::

    from typing import Annotated

    from fastapi import Depends, FastAPI
    from lehnz_async import Tracker
    from lehnz_async.asgi import get_tracker, lifespan

    app = FastAPI(lifespan=lifespan(Tracker()))  # LEHNZ_API_KEY from the environment


    @app.post("/products/{product_id}/view")
    async def view(product_id: str, tracker: Annotated[Tracker, Depends(get_tracker)]) -> None:
        tracker.track("usr_1", "view", item_id=product_id)

- `lifespan` starts the tracker when the app starts and, when it stops, flushes and
  closes it (bounded by the tracker's ``close_timeout``). It wraps a lifespan the app
  already has, so that the app's own shutdown code can still track.
- `get_tracker` finds the tracker of the request's app: a FastAPI dependency, or a
  plain call in Starlette. ``request.state.lehnz_tracker`` is the same object.
- `anonymous_id` keeps an anonymous user id in a cookie, to track visitors before they
  sign in and to merge them into their account with `Tracker.identify` when they do.

Neither Starlette nor FastAPI is imported here (neither is a dependency of this
package): a Starlette lifespan is just a callable ``app -> async context manager``, and
the request and response are used through the few attributes this module touches.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, NamedTuple, Protocol

from ._exceptions import ConfigurationError, TrackerClosedError
from ._tracker import Tracker

__all__ = [
    "ANONYMOUS_ID_COOKIE",
    "STATE_KEY",
    "AnonymousId",
    "anonymous_id",
    "get_tracker",
    "lifespan",
]

#: Name of the tracker in the lifespan state (``request.state.lehnz_tracker``) and on
#: ``app.state``.
STATE_KEY = "lehnz_tracker"
#: The cookie `anonymous_id` reads and sets.
ANONYMOUS_ID_COOKIE = "lehnz_anon_id"
_ANONYMOUS_ID_MAX_AGE = 365 * 24 * 60 * 60  # one year, in seconds
# what a cookie value must look like to be used as a user id (it comes from the client)
_USABLE_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


class _Connection(Protocol):
    """What is used of a Starlette ``Request`` (or ``HTTPConnection``, ``WebSocket``)."""

    @property
    def app(self) -> Any: ...

    @property
    def state(self) -> Any: ...

    @property
    def cookies(self) -> Mapping[str, str]: ...


class _CookieSetter(Protocol):
    """What is used of a Starlette ``Response``."""

    def set_cookie(
        self,
        key: str,
        value: str = ...,
        max_age: int | None = ...,
        *,
        httponly: bool = ...,
        samesite: Literal["lax", "strict", "none"] | None = ...,
    ) -> None: ...


def lifespan(
    tracker: Tracker | Callable[[], Tracker],
    *,
    app_lifespan: Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]
    | None = None,
    state_key: str = STATE_KEY,
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """A Starlette/FastAPI lifespan that runs ``tracker`` while the app runs.

    At startup the tracker is started, set as ``app.state.<state_key>``, and then the
    app's own lifespan (``app_lifespan``) is entered; the state is what that lifespan
    yields plus the tracker under ``state_key``, so endpoints find it as
    ``request.state.lehnz_tracker`` or through `get_tracker`. At shutdown the app's own
    lifespan exits first (its shutdown code may still track), then `Tracker.aclose`
    sends what is queued and waits for it, at most the tracker's ``close_timeout``
    seconds (keep that below the time your platform gives the process to stop). The
    tracker is closed even when startup or shutdown fails.

    Usage::

        app = FastAPI(lifespan=lifespan(Tracker()))
        # a new tracker each time the app starts, around the lifespan the app had:
        app = FastAPI(lifespan=lifespan(lambda: Tracker(flush_interval=5.0),
                                        app_lifespan=existing_lifespan))

    Args:
        tracker: A `Tracker`, or a function that makes one (such as the `Tracker`
            class itself), called each time the app starts. A closed tracker cannot be
            restarted, so pass a function when the app may start more than once (as
            tests using a ``TestClient`` per test do).
        app_lifespan: The lifespan the app already has (``app -> async context
            manager``, as ``@contextlib.asynccontextmanager`` makes); it may yield a
            state mapping or nothing.
        state_key: The tracker's name in the state. `get_tracker` looks up the default
            one; a second tracker under another name is reached as
            ``request.state.<name>``.

    Returns:
        The lifespan to pass as ``Starlette(lifespan=...)`` or ``FastAPI(lifespan=...)``.

    Raises:
        TypeError: ``tracker`` is neither a `Tracker` nor callable.

    The app's startup fails with `TrackerClosedError` when the given tracker is closed,
    and with `ConfigurationError` when the app's own state already uses ``state_key``.
    """
    if not isinstance(tracker, Tracker) and not callable(tracker):
        raise TypeError(
            f"lifespan() takes a Tracker or a function returning one, not {type(tracker).__name__}"
        )

    @contextlib.asynccontextmanager
    async def tracker_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        instance = tracker if isinstance(tracker, Tracker) else tracker()
        if not isinstance(instance, Tracker):
            raise TypeError(f"the tracker factory returned {type(instance).__name__}, not Tracker")
        try:
            await instance.start()
        except TrackerClosedError as exc:
            raise TrackerClosedError(
                "the Tracker given to lifespan() is closed (the app's last shutdown closed it) "
                "and closed trackers cannot restart; to start an app more than once, pass a "
                "function that makes one: lifespan(Tracker) or lifespan(lambda: Tracker(...))"
            ) from exc
        try:
            app_state = getattr(app, "state", None)  # None for a bare Router
            if app_state is not None:
                setattr(app_state, state_key, instance)
            if app_lifespan is None:
                yield {state_key: instance}
                return
            async with app_lifespan(app) as own_state:
                state = dict(own_state or {})
                if state_key in state:
                    raise ConfigurationError(
                        f"the app's lifespan state already has {state_key!r}; pass "
                        "lifespan(..., state_key=...) another name"
                    )
                state[state_key] = instance
                yield state
        finally:
            await instance.aclose()

    return tracker_lifespan


class _TrackerLookup:
    """The type of `get_tracker`: a function whose signature FastAPI can read.

    FastAPI hands the request only to a parameter annotated with a Starlette class, but
    this module must not import Starlette, which is not a dependency of this package: so
    the signature is made when it is asked for, by FastAPI, once Starlette is there.
    """

    __name__ = "get_tracker"

    def __call__(self, request: _Connection) -> Tracker:
        """The `Tracker` that `lifespan` started for the app serving ``request``.

        Use it as a FastAPI dependency (``tracker: Annotated[Tracker,
        Depends(get_tracker)]``; FastAPI runs a plain-function dependency in its thread
        pool, so in busy ``async def`` endpoints ``request.state.lehnz_tracker`` is
        cheaper), or call it with a Starlette ``Request`` or ``WebSocket``. It looks in
        the request's lifespan state, then on ``request.app.state``.

        Raises:
            ConfigurationError: the app was not started with `lifespan` (or its server
                ran no lifespan, as ``uvicorn --lifespan off`` does).
        """
        found = getattr(request.state, STATE_KEY, None)
        if found is None:
            found = getattr(getattr(request.app, "state", None), STATE_KEY, None)
        if not isinstance(found, Tracker):
            raise ConfigurationError(
                "no Tracker on this request's app: create the app with "
                "lifespan=lehnz_async.asgi.lifespan(Tracker()), and run it on a server "
                "with lifespan support (uvicorn runs it unless --lifespan off)"
            )
        return found

    @property
    def __signature__(self) -> inspect.Signature:
        try:
            from starlette.requests import HTTPConnection

            annotation: object = HTTPConnection
        except ImportError:
            annotation = _Connection
        parameter = inspect.Parameter(
            "request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation
        )
        return inspect.Signature([parameter], return_annotation=Tracker)

    def __repr__(self) -> str:
        return "<function lehnz_async.asgi.get_tracker>"


get_tracker = _TrackerLookup()
get_tracker.__doc__ = _TrackerLookup.__call__.__doc__


class AnonymousId(NamedTuple):
    """What `anonymous_id` found or made."""

    #: The anonymous user id: the cookie's value, or a new ``anon_`` + 32 hex digits.
    user_id: str
    #: Whether it was made for this request (no usable cookie came with it).
    is_new: bool


def anonymous_id(
    request: _Connection,
    response: _CookieSetter | None = None,
    *,
    cookie: str = ANONYMOUS_ID_COOKIE,
    max_age: int = _ANONYMOUS_ID_MAX_AGE,
) -> AnonymousId:
    """The visitor's anonymous user id, kept in a cookie from one request to the next.

    Reads the ``cookie``; when the request has none, or a value unfit for a user id (it
    comes from the client: empty, over 128 characters, or with characters other than
    letters, digits and ``_.:-``), makes a new random id. Track the visitor's events
    under it until they sign in; then merge it into their account and track under the
    account's id from then on::

        anon = anonymous_id(request)
        if not anon.is_new:
            tracker.identify(user.id, previous_user_id=anon.user_id)
        response.delete_cookie(ANONYMOUS_ID_COOKIE)  # the next visitor of this browser
                                                      # is someone new

    Call it once per request (or from a FastAPI dependency, which FastAPI calls once):
    every call without a usable cookie makes a different id.

    Args:
        request: A Starlette ``Request`` (or ``WebSocket``).
        response: If given and the id is new, the cookie is set on it (``max_age``,
            ``HttpOnly``, ``SameSite=Lax``); in FastAPI, declare a ``response: Response``
            parameter and pass it. Otherwise set the cookie yourself when ``is_new``.
        cookie: The cookie's name.
        max_age: The cookie's lifetime, in seconds.

    Returns:
        The id, and whether it is new.
    """
    value = request.cookies.get(cookie)
    if value is not None and _USABLE_ID.fullmatch(value):
        return AnonymousId(value, False)
    new = AnonymousId("anon_" + secrets.token_hex(16), True)
    if response is not None:
        response.set_cookie(cookie, new.user_id, max_age, httponly=True, samesite="lax")
    return new
