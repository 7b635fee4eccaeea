"""How a `ReferenceServer` misbehaves on purpose: `Fault`, `FaultPlan`, and the record
of an `Outage`."""

from __future__ import annotations

import collections
import dataclasses
import random
from collections.abc import Callable
from typing import Any, NamedTuple

from ._contract import DEFAULT_MAX_BODY_SIZE, OutageKind


class Outage(NamedTuple):
    """One outage of a `ReferenceServer`, in the loop's time (``loop.time()``)."""

    kind: OutageKind
    #: When it began.
    start: float
    #: When it ended; None while it lasts.
    end: float | None


@dataclasses.dataclass
class Fault:
    """One misbehaviour, for one request.

    Attributes:
        status: The status to answer (ignored when ``drop_connection``).
        retry_after: The ``Retry-After`` header to send, as written (seconds or a date).
        message: The JSON ``error`` message; a default names the status.
        delay: Seconds to wait before answering (beyond a client's timeout: a timeout).
        drop_connection: Close the connection without answering.
        plain_text: Send the message as text/plain instead of JSON.
        process: Handle the request normally first (store its events), then misbehave:
            ``delay`` makes the answer late, ``drop_connection`` loses it; the client
            cannot tell that its events arrived, and a retry is a duplicate.
        body: Raw bytes to answer instead of a message (a proxy's HTML or Latin-1
            page, a truncated or 100,000-deep JSON document), as ``text/html``.
    """

    status: int = 503
    retry_after: str | None = None
    message: str | None = None
    delay: float = 0.0
    drop_connection: bool = False
    plain_text: bool = False
    process: bool = False
    body: bytes | None = None


@dataclasses.dataclass
class FaultPlan:
    """How a `ReferenceServer` misbehaves; change it at any time, even mid-test.

    Attributes:
        latency: Seconds added before every answer.
        max_body_size: Bodies larger than this get 413 (JSON, from the server itself).
        proxy_body_limit: A proxy's body limit in front of the server (nginx's
            ``client_max_body_size``): bodies larger than this get nginx's HTML
            ``413 Request Entity Too Large``, decided from ``Content-Length`` before the
            body is read when the request has one, else once the bound is passed while
            reading. None: no proxy.
        reject_event: Called with each event of a valid request; a returned string
            rejects the request with ``400`` and that message (one bad event rejects
            the array, as the contract assumes).
        random_faults: ``(probability, Fault)`` pairs drawn for each ingest request
            (after any queued fault), with ``seed`` for repeatable runs.
        fail_event: Called with each event of a valid request; a returned status (500,
            say) answers the whole request with it, storing nothing: a server bug that
            one payload triggers every time (a poison event).
    """

    latency: float = 0.0
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    proxy_body_limit: int | None = None
    reject_event: Callable[[dict[str, Any]], str | None] | None = None
    fail_event: Callable[[dict[str, Any]], int | None] | None = None
    random_faults: list[tuple[float, Fault]] = dataclasses.field(default_factory=list)
    seed: int | None = None
    _queued: collections.deque[Fault] = dataclasses.field(
        default_factory=collections.deque, repr=False
    )
    _rng: random.Random = dataclasses.field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        *,
        retry_after: str | None = None,
        message: str | None = None,
        delay: float = 0.0,
        drop_connection: bool = False,
        plain_text: bool = False,
        process: bool = False,
        body: bytes | None = None,
    ) -> None:
        """Make the next ``n`` ingest requests fail this way (see `Fault`)."""
        fault = Fault(
            status, retry_after, message, delay, drop_connection, plain_text, process, body
        )
        self._queued.extend([fault] * n)

    def next_fault(self) -> Fault | None:
        """The fault for the request arriving now, if any (queued first, then random)."""
        if self._queued:
            return self._queued.popleft()
        if self.random_faults:
            draw = self._rng.random()
            for probability, fault in self.random_faults:
                if draw < probability:
                    return fault
                draw -= probability
        return None
