"""A Redis Streams worker that loses no message: it acknowledges a message only once
Lehnz has taken the event made from it.

Run as many as you like, one process each, in one consumer group; Redis spreads the
stream over them and keeps what each has not acknowledged::

    python examples/stream_worker.py --consumer w1 --stream orders --group lehnz
    python examples/stream_worker.py --consumer w2 --stream orders --group lehnz

Each message is a hash with the fields ``user``, ``event`` and optionally ``item``; it
becomes ``tracker.track(user, event, item_id=item, context={"stream_id": <message id>,
"consumer": <this consumer>})``, so that the server side can tell a message delivered
twice from two messages.

How a message is acknowledged (``--ack-mode mark``, the default):

1. ``XREADGROUP`` reads up to ``--count`` messages. Redis puts each in the group's
   pending entries list (PEL) under this consumer's name until it is ``XACK``ed.
2. Each message is tracked (``track()`` is a plain call: it queues the event), then
   ``tracker.mark()`` closes the *window* of events tracked since the previous mark. It
   forces no send, but no batch spans two windows: hence reads of about a batch (500).
   When a read finds the stream idle, ``flush()`` sends the partial batch at once
   instead of after the tracker's ``flush_interval``.
3. A separate task awaits ``mark.settled()``: a `lehnz_async.Receipt` once every event of
   the window is delivered, failed for good, dropped, filtered by ``before_send``, spooled
   or given up at close. Only
   if ``receipt.ok_to_ack`` (nothing dropped, nothing given up unacknowledged) does it
   ``XACK`` the window's messages; otherwise it logs why and leaves them pending, and
   Redis gives them to a consumer again (below). Events that *failed for good* (the
   server rejected them, retries ran out) are acknowledged: a redelivery would fail again,
   and ``on_error`` has them.
4. Reading does not wait for acknowledgements: the next read starts at once, while earlier
   windows settle. At most ``--windows`` windows are outstanding; then reading pauses
   until the oldest is settled (during an outage the worker stops reading instead of
   holding an ever-growing backlog).

A consumer that dies (SIGKILL, OOM, a lost machine) leaves its unacknowledged messages in
the PEL. Every ``--claim-every`` seconds each worker takes, with ``XAUTOCLAIM``, those that
have been pending for longer than ``--min-idle`` seconds, whoever held them, and
processes them like new ones. So a message is delivered at least once; it is delivered
twice only if its consumer died after its event was sent but before its ``XACK``. To
keep ``XAUTOCLAIM`` from taking messages from a *live* consumer that is only waiting on a
slow delivery (an outage), each worker touches (``XCLAIM ... JUSTID``, which resets the
idle time) the messages it still holds every third of ``--min-idle``. A worker restarted
under the same ``--consumer`` name first reads back its own pending messages.

SIGTERM (or Ctrl+C): stop reading, ``await tracker.aclose()`` (which sends what is left
within ``--close-timeout`` seconds), acknowledge every window that settled ok, exit 0.
What was not delivered by then stays pending for another consumer.

``--ack-mode flush`` is the simple alternative, kept as the baseline for
``benchmarks/stream_worker.py``: after every ``--flush-every`` messages it awaits
``tracker.flush()`` (which forces out the partial batch and returns the Receipt of what it
covered), acknowledges, and only then reads on.

Options come from the command line, or else from the environment: ``--redis``
(``STREAM_WORKER_REDIS``), ``--stream`` (``STREAM_WORKER_STREAM``), ``--group``
(``STREAM_WORKER_GROUP``), ``--consumer`` (``STREAM_WORKER_CONSUMER``, default
``<host>-<pid>``), ``--endpoint`` (``LEHNZ_ENDPOINT``), ``--api-key`` (``LEHNZ_API_KEY``).
Needs ``pip install redis`` (redis-py ≥ 5) and Redis ≥ 6.2 (``XAUTOCLAIM``). For
throughput, ``pip install 'redis[hiredis]'``: reading three-field messages 500 at a time,
redis-py's pure-Python reply parser took 42 µs of CPU a message here, hiredis 3 µs (a
``track()`` call is under 1 µs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError
from redis.typing import StreamIdT

from lehnz_async import DeliveryError, InvalidEventError, Mark, Receipt, Tracker

log = logging.getLogger("stream_worker")

#: A stream message as redis-py returns it with ``decode_responses=True``: its id and
#: its fields (None, on Redis 6.2, for an entry deleted from the stream while pending).
Message = tuple[str, dict[str, str] | None]


# -- options ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    redis: str
    stream: str
    group: str
    consumer: str
    endpoint: str | None  # None: the tracker reads LEHNZ_ENDPOINT, or uses the default
    api_key: str | None  # None: the tracker reads LEHNZ_API_KEY
    ack_mode: str  # "mark" or "flush"
    count: int  # messages per read: one window
    windows: int  # most windows outstanding (read, not yet settled and acked)
    flush_every: int  # --ack-mode flush: messages between flushes
    min_idle: float  # seconds pending before XAUTOCLAIM takes a message
    claim_every: float  # seconds between XAUTOCLAIM sweeps
    block: float  # seconds an XREADGROUP waits for new messages
    close_timeout: float  # seconds aclose() may take at SIGTERM


def parse_options(argv: Sequence[str] | None = None) -> Options:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="Read a Redis Stream in a consumer group, track each message with "
        "lehnz_async, XACK only what Lehnz has taken.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--redis", default=env("STREAM_WORKER_REDIS", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--stream", default=env("STREAM_WORKER_STREAM", "events"))
    parser.add_argument("--group", default=env("STREAM_WORKER_GROUP", "lehnz"))
    parser.add_argument(
        "--consumer",
        default=env("STREAM_WORKER_CONSUMER", f"{socket.gethostname()}-{os.getpid()}"),
        help="this worker's name in the group: unique per live worker",
    )
    parser.add_argument("--endpoint", default=env("LEHNZ_ENDPOINT"))
    parser.add_argument("--api-key", default=env("LEHNZ_API_KEY"))
    parser.add_argument("--ack-mode", choices=["mark", "flush"], default="mark")
    parser.add_argument(
        "--count",
        type=int,
        default=500,
        help="messages per read: a window, and so at most a batch (500 events at most)",
    )
    parser.add_argument("--windows", type=int, default=8, help="most windows outstanding")
    parser.add_argument("--flush-every", type=int, default=500, help="--ack-mode flush only")
    parser.add_argument(
        "--min-idle",
        type=float,
        default=60.0,
        help="seconds a message is pending before another consumer claims it: well above "
        "the time a window takes to settle",
    )
    parser.add_argument("--claim-every", type=float, default=10.0)
    parser.add_argument("--block", type=float, default=1.0, help="seconds XREADGROUP waits")
    parser.add_argument("--close-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    return Options(**vars(args))


# -- the worker ------------------------------------------------------------------------


@dataclass
class Window:
    """The messages of one read (or one claimed page), and the receipt of their events."""

    ids: list[str]  # every message of the window: what to XACK
    read_at: float  # loop.time() of the read
    mark: Mark  # the end of the window's events in the tracker


@dataclass
class Counters:
    read: int = 0  # messages read: new ones, our own pending ones and claimed ones
    claimed: int = 0  # of which taken with XAUTOCLAIM
    invalid: int = 0  # of which could not become an event (acknowledged all the same)
    acked: int = 0
    left_pending: int = 0  # in windows that were not ok_to_ack
    windows: int = 0


class StreamWorker:
    def __init__(self, client: aioredis.Redis, tracker: Tracker, options: Options) -> None:
        self.redis = client
        self.tracker = tracker
        self.options = options
        self.counters = Counters()
        self.stopping = False
        #: Windows read and not yet concluded (acked or left pending), oldest first.
        self.outstanding: deque[Window] = deque()
        self.held: set[str] = set()  # the ids of the outstanding windows
        self.room = asyncio.Event()  # set when a window is concluded, or at stop()
        self.work = asyncio.Event()  # set when a window is opened, or at stop()
        self.claim_cursor = "0-0"  # where the current XAUTOCLAIM sweep has got to
        self.next_claim = 0.0  # loop.time() of the next sweep: the first one at once
        self.cut: asyncio.Future[Receipt] | None = None  # a flush() for its cut, see read_loop

    def stop(self) -> None:
        """SIGTERM: finish the read in progress, then stop reading."""
        if not self.stopping:
            log.info("stopping: no more reads; closing the tracker, then acknowledging")
        self.stopping = True
        self.room.set()
        self.work.set()

    def stop_if_failed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.stop()  # run() re-raises it once the tracker is closed

    async def run(self) -> None:
        o = self.options
        try:  # the group, reading the stream from its start, unless it exists
            await self.redis.xgroup_create(o.stream, o.group, "0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        log.info("consumer %s reading %r in group %r, ack mode %s", o.consumer, o.stream,
                 o.group, o.ack_mode)  # fmt: skip
        if o.ack_mode == "flush":
            try:
                await self.run_flushing()
            finally:
                await self.tracker.aclose(o.close_timeout)
            return
        acker = asyncio.create_task(self.ack_loop())
        acker.add_done_callback(self.stop_if_failed)
        keeper = asyncio.create_task(self.keep_claims())
        try:
            await self.read_loop()
        finally:
            # Everything read was tracked and marked. aclose() sends what the tracker
            # holds, within close_timeout: what it cannot send by then is `unsent` in its
            # window's receipt. Then the acker concludes every window, and returns.
            self.stop()  # also when the reader failed (Redis gone): no read after this
            await self.tracker.aclose(o.close_timeout)
            self.work.set()
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await acker  # raises what stopped it, if it failed

    # -- reading -----------------------------------------------------------------------

    async def read_loop(self) -> None:
        await self.read_own_pending()
        loop = asyncio.get_running_loop()
        while not self.stopping:
            if len(self.outstanding) >= self.options.windows:
                # Back-pressure: the oldest window must be concluded before we read more.
                self.room.clear()
                await self.room.wait()
            elif self.claim_cursor != "0-0" or loop.time() >= self.next_claim:
                self.open_window(await self.claim_page())
            elif messages := await self.read_new():
                self.open_window(messages)
            elif self.outstanding and (self.cut is None or self.cut.done()):
                # The stream is idle: nothing more will fill the tracker's partial batch,
                # so have it sent now rather than after its flush_interval. flush() is
                # only for its cut here: every event is in a marked window already (its
                # receipt counts none), and the acker waits on those, not on this.
                self.cut = asyncio.ensure_future(self.tracker.flush())

    async def read_own_pending(self) -> None:
        """What this consumer name read in an earlier life and never acknowledged."""
        last = "0"
        while not self.stopping:
            while len(self.outstanding) >= self.options.windows and not self.stopping:
                self.room.clear()
                await self.room.wait()
            messages = await self.xreadgroup(last, block=None)
            if not messages:
                return
            log.info("re-reading %d of my own pending messages", len(messages))
            self.open_window(messages)
            last = messages[-1][0]

    async def read_new(self) -> list[Message]:
        return await self.xreadgroup(">", block=int(self.options.block * 1000))

    async def xreadgroup(self, last_id: str, block: int | None) -> list[Message]:
        o = self.options
        reply = await self.redis.xreadgroup(
            o.group, o.consumer, {o.stream: last_id}, o.count, block
        )
        # [[stream, [(id, fields), ...]]] (RESP2, redis-py's default); [] if the block timed out
        return cast(list[tuple[str, list[Message]]], reply)[0][1] if reply else []

    async def claim_page(self) -> list[Message]:
        """One page of an XAUTOCLAIM sweep: messages pending for longer than --min-idle,
        whoever held them, now ours."""
        o = self.options
        reply = await self.redis.xautoclaim(
            o.stream,
            o.group,
            o.consumer,
            min_idle_time=int(o.min_idle * 1000),
            start_id=self.claim_cursor,
            count=o.count,
        )
        # [next cursor, [(id, fields), ...], ids deleted from the stream (Redis 7)]
        self.claim_cursor = str(reply[0])
        if self.claim_cursor == "0-0":  # the sweep is complete
            self.next_claim = asyncio.get_running_loop().time() + o.claim_every
        # Our own messages are idle too when a window waits long: they are in hand.
        messages = [m for m in cast(list[Message], reply[1]) if m[0] not in self.held]
        if messages:
            self.counters.claimed += len(messages)
            log.info("claimed %d messages pending for over %g s", len(messages), o.min_idle)
        return messages

    def track(self, messages: list[Message]) -> list[str]:
        """Track each message (no await: nothing interleaves); their ids."""
        consumer = self.options.consumer
        for message_id, fields in messages:
            if fields is None:  # deleted from the stream while pending: nothing to send
                log.warning("message %s was deleted from the stream", message_id)
                self.counters.invalid += 1
                continue
            try:
                self.tracker.track(
                    fields["user"],
                    fields["event"],
                    item_id=fields.get("item"),
                    context={"stream_id": message_id, "consumer": consumer},
                )
            except (KeyError, InvalidEventError) as exc:
                # No redelivery can make this an event: it is acknowledged with the rest.
                log.warning("message %s cannot be tracked (%r)", message_id, exc)
                self.counters.invalid += 1
        self.counters.read += len(messages)
        return [message_id for message_id, _ in messages]

    def open_window(self, messages: list[Message]) -> None:
        """Track a read's messages and close their window with mark(); the acker takes it
        from there."""
        if not messages:
            return
        ids = self.track(messages)
        mark = self.tracker.mark()  # cheap, no await; it forces no send
        self.outstanding.append(Window(ids, asyncio.get_running_loop().time(), mark))
        self.held.update(ids)
        self.counters.windows += 1
        self.work.set()

    # -- acknowledging -----------------------------------------------------------------

    async def ack_loop(self) -> None:
        """Conclude the windows in the order they were read: once the oldest has settled,
        it and every later one settled by then, in one XACK."""
        while self.outstanding or not (self.stopping and self.tracker.closed):
            if not self.outstanding:
                self.work.clear()
                await self.work.wait()
                continue
            # No timeout needed: while we wait, keep_claims() keeps the messages ours.
            await self.outstanding[0].mark.settled()
            settled: list[Window] = []
            while self.outstanding and self.outstanding[0].mark.done:
                settled.append(self.outstanding.popleft())
            await self.acknowledge([(w.ids, await w.mark.settled()) for w in settled])
            for window in settled:
                self.held.difference_update(window.ids)
            self.room.set()

    async def acknowledge(self, windows: list[tuple[list[str], Receipt]]) -> None:
        """XACK the messages of the windows whose receipt says ok_to_ack (one command);
        leave the others' pending, to be delivered again."""
        ok: list[str] = []
        for ids, receipt in windows:
            if not receipt.ok_to_ack:
                log.warning(
                    "leaving %d messages pending for redelivery: of their %d events %d were "
                    "dropped and %d given up at close",
                    len(ids),
                    receipt.events,
                    receipt.dropped,
                    receipt.unsent,
                )
                self.counters.left_pending += len(ids)
                continue
            if receipt.failed:
                log.warning(
                    "%d of %d events failed for good (on_error has them): acknowledged, "
                    "as a redelivery would fail again",
                    receipt.failed,
                    receipt.events,
                )
            ok += ids
        if ok:
            await self.redis.xack(self.options.stream, self.options.group, *ok)
            self.counters.acked += len(ok)

    async def keep_claims(self) -> None:
        """Every third of --min-idle, reset the idle time of the messages this live worker
        has held that long, so that no other consumer's XAUTOCLAIM takes them while their
        window waits (an outage). JUSTID: their delivery count stays as it is."""
        o = self.options
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(o.min_idle / 3)
            old = loop.time() - o.min_idle / 3
            ids: list[StreamIdT] = [
                i for window in self.outstanding if window.read_at < old for i in window.ids
            ]
            if ids:
                try:
                    await self.redis.xclaim(o.stream, o.group, o.consumer, 0, ids, justid=True)
                except RedisError as exc:  # try again next time; XAUTOCLAIM is the cost
                    log.warning("could not touch %d held messages: %r", len(ids), exc)

    # -- the baseline: flush every N messages ------------------------------------------

    async def run_flushing(self) -> None:
        """--ack-mode flush: read and track, and every --flush-every messages (or when
        the stream is idle) await tracker.flush(), which forces out a partial batch and
        returns the receipt of what it covered; acknowledge; only then read on."""
        loop = asyncio.get_running_loop()
        ids: list[str] = []
        while not self.stopping:
            if self.claim_cursor != "0-0" or loop.time() >= self.next_claim:
                messages = await self.claim_page()
            else:
                messages = await self.read_new()
            ids += self.track(messages)
            if len(ids) >= self.options.flush_every or (ids and not messages):
                await self.acknowledge([(ids, await self.tracker.flush())])
                ids = []
        if ids:  # read before the stop
            await self.acknowledge([(ids, await self.tracker.flush())])

    def summary(self) -> str:
        c = self.counters
        return (
            f"stopped: read {c.read} (claimed {c.claimed}, invalid {c.invalid}), "
            f"acked {c.acked}, left pending {c.left_pending}, windows {c.windows}"
        )


def on_error(error: DeliveryError) -> None:
    log.warning("%d events not delivered: %s", len(error.events), error)


async def main(options: Options) -> int:
    client = aioredis.Redis.from_url(options.redis, decode_responses=True)
    tracker = Tracker(options.api_key, endpoint=options.endpoint, on_error=on_error)
    worker = StreamWorker(client, tracker, options)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    try:
        await worker.run()
    finally:
        await client.aclose()
    log.info("%s; %s", worker.summary(), tracker.stats)
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {options.consumer} %(name)s %(levelname)s: %(message)s",
    )
    return asyncio.run(main(options))


if __name__ == "__main__":
    sys.exit(run())
