"""The exception tree of lehnz_async.

::

    LehnzError
    ├── ConfigurationError (ValueError)   bad options or key (when the Tracker is made), or a
    │                                     tracker missing where asgi.get_tracker looks
    ├── InvalidEventError (ValueError)    bad track() arguments, raised at the call site
    ├── TrackerClosedError                start() on a closed tracker
    ├── BlockingCallError (RuntimeError)  a call that would wait on a loop that cannot run it
    ├── RecommendationError               recommend() got no usable answer
    └── DeliveryError                     events that could not be delivered; given to on_error
        ├── RejectedError                 the server refused them (400, 413, other 4xx)
        ├── AuthenticationError           the key was refused (401, 403)
        ├── RetriesExhaustedError         429/5xx/timeouts/connection errors outlasted the policy
        ├── EncodeError                   an event msgspec cannot serialize (its ``context``)
        └── ShutdownError                 still undelivered at the close deadline, or tracked
                                          after close

Programming mistakes raise at the call site. Delivery problems never raise into the
caller: they are counted in ``Tracker.stats`` and handed to ``on_error`` as a
`DeliveryError` carrying the events concerned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._event import Event


class LehnzError(Exception):
    """Root of every exception raised or reported by lehnz_async."""


class ConfigurationError(LehnzError, ValueError):
    """An option or the API key is unusable (raised when the `Tracker` is made), or the
    ASGI integration is not set up (raised by `lehnz_async.asgi.get_tracker`)."""


class InvalidEventError(LehnzError, ValueError):
    """A `track()` argument is invalid; the message names the field.

    Attributes:
        field: The offending argument's name.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TrackerClosedError(LehnzError):
    """The tracker was closed; closed trackers cannot be restarted."""


class BlockingCallError(LehnzError, RuntimeError):
    """A call would wait on an event loop that cannot run it.

    `Tracker.close()` or `Tracker.flush_sync()` on the thread of the loop that runs the
    tracker (it would wait forever), or any waiting call while the tracker's loop exists
    but is not running.
    """


class RecommendationError(LehnzError):
    """`Tracker.recommend()` got no usable answer from ``/recommend``.

    Attributes:
        status: The HTTP status, or None when there was no answer.
        server_message: The server's error message, or None.
    """

    def __init__(
        self, message: str, *, status: int | None = None, server_message: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class DeliveryError(LehnzError):
    """Events that could not be delivered, as reported to ``on_error``.

    Attributes:
        events: The events concerned, the same objects that were queued.
        status: The HTTP status the server answered, or None (no answer, or not sent).
        server_message: The server's error message (its JSON ``error`` field, or the
            start of a plain-text body), or None.
        endpoint: The ingestion URL the events were for (named in the message).
    """

    def __init__(
        self,
        message: str,
        events: Sequence[Event],
        *,
        status: int | None = None,
        server_message: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.events: tuple[Event, ...] = tuple(events)
        self.status = status
        self.server_message = server_message
        self.endpoint = endpoint

    def __str__(self) -> str:
        message = super().__str__()
        if self.endpoint is None:
            return message
        return f"{message} [endpoint {self.endpoint}]"


class RejectedError(DeliveryError):
    """The server refused the events (400, 413 or another non-retryable 4xx)."""


class AuthenticationError(DeliveryError):
    """The server refused the API key (401) or a secret key (403)."""


class RetriesExhaustedError(DeliveryError):
    """Retryable failures (429, 5xx, timeouts, connection errors) outlasted the policy."""


class EncodeError(DeliveryError):
    """An event could not be serialized to JSON (usually a value in its ``context``)."""


class ShutdownError(DeliveryError):
    """Undelivered when the close deadline passed, or tracked after the tracker closed."""
