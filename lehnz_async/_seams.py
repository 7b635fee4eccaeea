"""What the engine takes from the world besides its options: the seams a test replaces.

`Seams` is handed to the engine's parts as the tracker makes them (`Tracker._assemble`),
never patched in afterwards. `Tracker()` uses the defaults; the deterministic
simulation (`Tracker._simulated`) gives an in-memory transport and spool
(`lehnz_async.testing.MemorySpool`), a seeded random source, the loop's virtual time
and no threads of the tracker's own.

The clocks the engine reads:

- the event loop's, ``loop.time()``, for every timer and duration of delivery (the
  flush interval, backoff and ``Retry-After`` pauses, request durations, outages and
  probes, ``max_event_age``, the close deadline's cancel scope): looptime makes it
  virtual, so it needs no seam;
- `Seams.clock`, where a time is read apart from the loop's timers: the close deadline
  as ``aclose()``/``close()`` marks it (on the caller's thread) and as the flusher checks
  it between ``before_send`` calls (a hook that blocks the loop keeps its timers from
  firing), and attribution's TTL (read in ``track()``, on any thread);
- real time on purpose, deciding nothing: how long a hook took (``time.perf_counter``,
  logged when slow) and how often "buffer full" is logged (``time.monotonic``);
- wall time (``time.time``) where a date is meant: an HTTP-date ``Retry-After`` and a
  spool row's ``created_at``.

Randomness: `Seams.rng` draws the jitter of backoffs and probes. Idempotency keys come
from ``os.urandom`` and are only ever compared for equality, so they are no seam.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._spool import Spool
    from ._transport import BatchTransport


@dataclasses.dataclass(frozen=True)
class Seams:
    """The engine's seams, each given to the parts that use it when they are made."""

    #: Sends batches and answers ``recommend()``; None: made from the options (aiohttp,
    #: a connection pool for each, or the in-memory stand-in of ``capture=True``).
    transport: BatchTransport | None = None
    #: Keeps batches not delivered in time; None: a SQLite `Spool` at ``spool_path``,
    #: if one is given.
    spool: Spool | None = None
    #: Draws the jitter of backoffs and probes.
    rng: random.Random = dataclasses.field(default_factory=random.Random)
    #: The time where it is read apart from the loop's timers (see above).
    clock: Callable[[], float] = time.monotonic
    #: Whether a run that lost its loop resumes at once on a loop thread of its own, or
    #: on the next loop that calls in (the simulation: a thread would let real time in).
    resume_in_thread: bool = True


def loop_clock() -> float:
    """The running loop's time: the simulation's `Seams.clock` (virtual under looptime,
    where the tracker is only called on the loop)."""
    return asyncio.get_running_loop().time()
