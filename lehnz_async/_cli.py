"""The ``lehnz-async`` command: ``demo``, ``send`` and ``serve``; the only module that prints."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import logging
import math
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any, NoReturn

import msgspec

from .__about__ import __version__
from ._config import DEFAULT_INGEST_URL, DEFAULT_MAX_QUEUE_SIZE, ENDPOINT_ENV, resolve_api_key
from ._event import Event
from ._exceptions import (
    ConfigurationError,
    DeliveryError,
    EncodeError,
    InvalidEventError,
    RejectedError,
)
from ._inspector import host_name
from ._tracker import Tracker
from .testing import ReferenceServer

CHUNK = 5_000  # track() calls between two yields to the loop, so the flusher sends
_FIELDS = frozenset((  # what a JSONL line may hold
    "user_id", "event_name", "event_family", "item_id", "session_id", "recommendation_id",
    "context", "previous_user_id",
))  # fmt: skip
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}  # fmt: skip
_FUNNEL = {  # event kind -> weight, roughly the proportions of a shop's traffic
    "view": 48, "search": 14, "click": 20, "add_to_cart": 8, "remove_from_cart": 2,
    "checkout_start": 3, "purchase": 2, "custom": 2, "identify": 1,
}  # fmt: skip
_CUSTOM = (("wishlist_add", "engagement"), ("banner_impression", "exposure"))
_QUERIES = ("running shoes", "rain jacket", "backpack", "socks", "water bottle")
Call = tuple[Callable[..., None], tuple[Any, ...], dict[str, Any]]


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Bar:
    """Events delivered so far: a rich progress bar, or a line on stderr every second."""

    def __init__(self, total: int) -> None:
        self._total, self._last, self._shown = total, 0.0, -1
        try:
            from rich.console import Console
            from rich.progress import Progress
        except ImportError:
            self._rich: Any = None
            return
        self._rich = Progress(console=Console(stderr=True))
        self._rich.start()
        self._task = self._rich.add_task("delivered", total=total)

    def update(self, delivered: int, final: bool = False) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=delivered)
            if final:
                self._rich.stop()
        elif delivered != self._shown and (final or time.monotonic() - self._last >= 1.0):
            self._last, self._shown = time.monotonic(), delivered
            _err(f"delivered {delivered} of {self._total}")


def _demo_calls(tracker: Tracker, n: int, seed: int) -> list[Call]:
    """Build ``n`` realistic track()/identify() calls (a shop's funnel) before timing."""
    rng = random.Random(seed)
    users = max(1, n // 25)
    calls: list[Call] = []
    for kind in rng.choices(list(_FUNNEL), list(_FUNNEL.values()), k=n):
        u = rng.randrange(users)
        anon, known = f"anon_{u:06x}", f"usr_{u}"
        user = anon if u % 4 == 0 else known  # a quarter of the visitors never signed in
        session = f"sess_{u}_{rng.randrange(3)}"
        item = f"prod_{min(int(rng.paretovariate(1.1)), 5000):05d}"  # a long tail
        kw: dict[str, Any] = {"session_id": session}
        if kind == "identify":
            calls.append((tracker.identify, (known, anon), kw))
            continue
        if kind == "custom":
            kind, kw["event_family"] = rng.choice(_CUSTOM)
            kw["item_id"] = item
        elif kind == "search":
            kw["context"] = {"query": rng.choice(_QUERIES), "page": 1 + rng.randrange(3)}
        elif kind in ("view", "click"):
            kw["item_id"] = item
            kw["context"] = {"page": rng.choice(("home", "category", "product"))}
            if kind == "click" and rng.random() < 0.3:
                kw["recommendation_id"] = f"rec_{rng.randrange(1 << 32):08x}"
        else:
            kw["item_id"] = item
            kw["context"] = {"price": round(rng.uniform(5, 200), 2), "quantity": 1}
        calls.append((tracker.track, (user, kind), kw))
    return calls


OUTAGE_SECONDS = 3.0


async def _demo(n: int, seed: int, outage: float = OUTAGE_SECONDS) -> int:
    errors: list[DeliveryError] = []
    async with ReferenceServer() as server:
        # probes every second at most, so the demo notices the end of its short outage soon
        tracker = Tracker(
            server.api_key, endpoint=server.url, on_error=errors.append, probe_max_delay=1.0
        )
        calls = _demo_calls(tracker, n, seed)
        bar = _Bar(n)
        tracking = 0.0
        start = time.perf_counter()
        for first in range(0, n, CHUNK):
            if outage and first == (n // 2) // CHUNK * CHUNK:
                # halfway: the service goes away for a while; nothing may be lost
                await server.outage("refuse", outage)
            t0 = time.perf_counter()
            for fn, args, kwargs in calls[first : first + CHUNK]:
                fn(*args, **kwargs)
            tracking += time.perf_counter() - t0
            await asyncio.sleep(0)
            if tracker.stats.queued + CHUNK > DEFAULT_MAX_QUEUE_SIZE:  # more would be dropped
                await tracker.flush()
            bar.update(tracker.stats.delivered)
        closing = asyncio.ensure_future(tracker.aclose())
        while not closing.done():
            await asyncio.wait({closing}, timeout=0.1)  # a redraw interval, not a sync
            bar.update(tracker.stats.delivered)
        await closing
        elapsed = time.perf_counter() - start
        bar.update(tracker.stats.delivered, final=True)
        received = len(server.events)
        loop_lines, loop_ok = await _attribution_loop(server)
    s = tracker.stats
    for error in errors[:5]:
        _err(f"not delivered: {len(error.events)} event(s): {error}")
    print(f"tracked {s.tracked}, delivered {s.delivered} of {n}, failed {s.failed}, ", end="")
    print(f"dropped {s.dropped}; {s.batches} batches, {s.requests} requests")
    print(f"the server holds {received} events")
    if outage:
        print(
            f"outage: the server refused connections for {outage:g} s halfway through; the "
            f"tracker held what it could not send (outages seen: {s.outages}) and sent it when "
            f"the server came back: lost {n - received}"
        )
    print(f"{n:,} events in {elapsed:.1f} s, the outage included")
    print(f"one track() call: {tracking / n * 1e6:.2f} µs")
    for line in loop_lines:
        print(line)
    print("See your events live: `lehnz-async serve`, then open the printed address")
    ok = s.delivered == n and received == n
    return 0 if ok and loop_ok else 1


async def _attribution_loop(server: ReferenceServer) -> tuple[list[str], bool]:
    """Recommend, expose, click, purchase: and check the server saw them attributed."""
    before = len(server.events)
    async with Tracker(server.api_key, endpoint=server.url, attribution_ttl=600) as tracker:
        rec = await tracker.recommend("usr_demo", limit=4)
        tracker.expose("usr_demo", rec)
        item = rec.all_item_ids[0]
        tracker.track("usr_demo", "click", item_id=item)  # no recommendation_id passed
        tracker.track("usr_demo", "purchase", item_id=item, context={"price": 49.99})
    sent = server.events[before:]
    attributed = [e for e in sent if e.get("recommendation_id") == rec.recommendation_id]
    names = [e["event_name"] for e in attributed]
    ok = names.count("exposure") == len(rec.all_item_ids) and "purchase" in names
    return [
        f"attribution loop: recommend -> {rec.recommendation_id} {rec.all_item_ids}; "
        f"expose, click, purchase -> {len(attributed)} of {len(sent)} events carry it "
        f"({', '.join(names)})"
    ], ok


_decode = msgspec.json.Decoder().decode
_BOM = b"\xef\xbb\xbf"
WINDOW = 30_000  # lines tracked and not yet known to be settled, at most (memory bound)
CHUNK_LINES = 8_192  # lines between two barriers (flush() calls): the checkpoint's step
CHECKPOINT_SUFFIX = ".lehnz-checkpoint"
CHECKPOINT_EVERY = 0.5  # seconds between two checkpoint writes, at most one


class _Line(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A plain event line, decoded in one step (the fast path of `_send_line`)."""

    user_id: str
    event_name: str
    event_family: str | None = None
    item_id: str | None = None
    session_id: str | None = None
    recommendation_id: str | None = None
    context: dict[str, Any] | None = None
    previous_user_id: str | None = None


_decode_line = msgspec.json.Decoder(_Line).decode


def _send_line(tracker: Tracker, raw: bytes) -> str | None:
    """Queue the event of one JSONL line; return why it is bad, or None."""
    try:
        line = _decode_line(raw)
    except Exception:  # not a plain event (whatever msgspec raised): `_check_line` says why
        return _check_line(tracker, raw)
    if line.previous_user_id is not None or line.event_name == "identify":
        return _check_line(tracker, raw)
    try:
        tracker.track(
            line.user_id,
            line.event_name,
            item_id=line.item_id,
            event_family=line.event_family,
            session_id=line.session_id,
            recommendation_id=line.recommendation_id,
            context=line.context,
        )
    except InvalidEventError as exc:
        return str(exc)
    return None


def _check_line(tracker: Tracker, raw: bytes) -> str | None:
    """`_send_line` for any bytes: queue the event, or say what is wrong with the line."""
    try:
        obj = _decode(raw)
    except Exception:  # the kind of fault is ours to tell, whatever msgspec raised
        return f"not valid JSON ({_json_fault(raw)})"
    if obj.__class__ is not dict:
        return f"not a JSON object but {_JSON_TYPES.get(type(obj), 'something else')}"
    if not _FIELDS.issuperset(obj):
        return f"unknown field(s): {', '.join(sorted(set(obj) - _FIELDS))}"
    user_id, name = obj.pop("user_id", None), obj.pop("event_name", None)
    try:
        if name == "identify":
            for field in ("item_id", "recommendation_id"):
                if obj.get(field) is not None:
                    return f"{field}: not allowed on identify events"
            if obj.get("event_family") not in (None, "system"):
                return "event_family: identify events are in the system family"
            tracker.identify(
                user_id,
                obj.get("previous_user_id"),  # type: ignore[arg-type]  # identify() checks
                session_id=obj.get("session_id"),
                context=obj.get("context"),
            )
        elif obj.pop("previous_user_id", None) is not None:
            return "previous_user_id: only allowed on identify events"
        else:
            tracker.track(user_id, name, **obj)
    except InvalidEventError as exc:
        return str(exc)
    return None


_STRING = re.compile(rb'"(?:[^"\\\\]|\\\\.)*"?')  # a JSON string, or the unclosed tail of one
MAX_LINE_DEPTH = 512  # arrays and objects in one another, at most, that `send` reads


def _json_fault(raw: bytes) -> str:
    """What is wrong with ``raw``, which did not decode as JSON: said in our own words,
    never in a dependency's (its exceptions and wording change between releases)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}"
    if raw.count(b"[") + raw.count(b"{") <= MAX_LINE_DEPTH:
        return "malformed"
    depth = deepest = 0
    for byte in _STRING.sub(b"", raw):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    if deepest > MAX_LINE_DEPTH:
        return "nested too deeply"
    return "malformed"


def _context_key(context: object) -> bytes | None:
    if context is None:
        return None
    try:
        return msgspec.json.encode(context)
    except Exception:  # unencodable: the tracker reports it as an EncodeError
        return repr(context).encode("utf-8", "backslashreplace")


def _event_key(event: Event) -> tuple[object, ...]:
    """What tells events apart, from a queued `Event` (see `_line_key`)."""
    return (
        event.user_id,
        event.event_name,
        event.item_id,
        event.session_id,
        event.recommendation_id,
        event.previous_user_id,
        _context_key(event.context),
    )


def _line_key(obj: dict[str, Any]) -> tuple[object, ...]:
    """The same as `_event_key`, from the decoded line the event was made of."""
    return (
        obj.get("user_id"),
        obj.get("event_name"),
        obj.get("item_id"),
        obj.get("session_id"),
        obj.get("recommendation_id"),
        obj.get("previous_user_id"),
        _context_key(obj.get("context")),
    )


def _ranges(lines: Iterable[int]) -> list[list[int]]:
    """Sorted line numbers as ``[first, last]`` ranges."""
    out: list[list[int]] = []
    for n in sorted(set(lines)):
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def _show(ranges: list[list[int]]) -> str:
    """``line 7`` or ``lines 3-5, 9``."""
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges]
    if len(parts) == 1 and ranges[0][0] == ranges[0][1]:
        return f"line {parts[0]}"
    return "lines " + ", ".join(parts)


class _Chunk:
    """Lines read together, until every event tracked from them is settled."""

    __slots__ = ("first", "index", "last", "lines", "untracked")

    def __init__(self, first: int, lines: list[bytes]) -> None:
        self.first = first  # the line number of lines[0]
        self.last = first + len(lines) - 1
        self.lines = lines
        self.untracked: set[int] = set()  # blank, bad or skipped lines
        self.index: dict[tuple[object, ...], list[int]] | None = None

    def take_line(self, key: tuple[object, ...]) -> int | None:
        """The first line of this chunk not yet taken whose event has this key."""
        if self.index is None:  # built on the first failure only
            self.index = {}
            for i, raw in enumerate(self.lines):
                n = self.first + i
                if n in self.untracked:
                    continue
                obj = _decode(raw)  # a line that was tracked: a JSON object
                self.index.setdefault(_line_key(obj), []).append(n)
            for numbers in self.index.values():
                numbers.reverse()  # pop() takes the first
        found = self.index.get(key)
        return found.pop() if found else None


class _Checkpoint:
    """How far an import got, in a JSON file written atomically (temp file + rename).

    ``settled``: every line up to it was delivered, reported bad, or is listed in
    ``resend`` (``[first, last]`` ranges of lines whose events were not delivered for a
    reason that may pass: server down, retries out of time, key refused, interrupted).
    ``line``: the contiguous prefix, every line up to it delivered or reported bad.
    ``--resume`` skips the lines up to ``settled`` except those in ``resend``.
    """

    def __init__(self, path: str | None, source: str) -> None:
        self.path = path
        self.source = source
        self.settled = 0  # of a previous run
        self.resend: list[list[int]] = []  # of a previous run
        self._unwritable = False

    def load(self) -> str | None:
        """Read the checkpoint of a previous run; an error message, or None."""
        assert self.path is not None
        try:
            with open(self.path, "rb") as file:
                data = msgspec.json.decode(file.read())
            settled, resend, source = data["settled"], data["resend"], data["file"]
            assert isinstance(settled, int) and settled >= 0
            assert all(isinstance(a, int) and isinstance(b, int) and a <= b for a, b in resend)
            assert isinstance(source, str)
        except FileNotFoundError:
            _err(f"no checkpoint at {self.path}: starting from line 1")
            return None
        except (
            OSError,
            msgspec.DecodeError,
            ValueError,
            KeyError,
            TypeError,
            AssertionError,
        ) as exc:
            return f"unreadable checkpoint {self.path}: {exc or 'unexpected contents'}"
        if source != self.source:
            return f"checkpoint {self.path} is for {source}, not {self.source}"
        self.settled, self.resend = settled, sorted(resend)
        return None

    def skips(self, chunk: _Chunk) -> set[int] | None:
        """The lines of ``chunk`` done by a previous run (None: none of them)."""
        if chunk.first > self.settled:
            return None
        last = min(chunk.last, self.settled)
        done = set(range(chunk.first, last + 1))
        for a, b in self.resend:
            if b >= chunk.first and a <= last:
                done.difference_update(range(max(a, chunk.first), min(b, last) + 1))
        return done

    def state(self, settled: int, unsent: list[int]) -> tuple[int, int, list[list[int]]]:
        """``(line, settled, resend)`` once this run settled every line up to
        ``settled`` and failed to deliver ``unsent``."""
        old = [[max(a, settled + 1), b] for a, b in self.resend if b > settled]
        resend = _ranges([*unsent, *(n for a, b in old for n in range(a, b + 1))])
        settled = max(settled, self.settled)
        line = resend[0][0] - 1 if resend else settled
        return line, settled, resend

    def write(self, settled: int, unsent: list[int]) -> None:
        if self.path is None or self._unwritable:
            return
        line, settled, resend = self.state(settled, unsent)
        data = {"file": self.source, "line": line, "settled": settled, "resend": resend}
        temp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(temp, "wb") as file:
                file.write(msgspec.json.encode(data) + b"\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.path)
        except OSError as exc:
            self._unwritable = True
            _err(f"lehnz-async: cannot write the checkpoint {self.path}: {exc}")
            with contextlib.suppress(OSError):
                os.remove(temp)


class _Progress:
    """Lines read, lines/s and events delivered, drawn on stderr when it is a terminal."""

    def __init__(self, total_bytes: int | None) -> None:
        self._rich: Any = None
        if not sys.stderr.isatty():
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        self._started = time.monotonic()
        self._rich = Progress(
            BarColumn(),
            TextColumn("{task.fields[lines]:>11,} lines"),
            TextColumn("{task.fields[rate]:>9,.0f} lines/s"),
            TextColumn("{task.fields[delivered]:>11,} delivered"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self._rich.start()
        self._task = self._rich.add_task("send", total=total_bytes, lines=0, rate=0.0, delivered=0)

    def update(self, position: int, lines: int, delivered: int) -> None:
        if self._rich is not None:
            rate = lines / max(time.monotonic() - self._started, 1e-9)
            self._rich.update(
                self._task, completed=position, lines=lines, rate=rate, delivered=delivered
            )

    def stop(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


class _Import:
    """One ``lehnz-async send``: lines in, events tracked, every line accounted for."""

    def __init__(self, tracker_options: dict[str, Any], checkpoint: _Checkpoint) -> None:
        self.tracker = Tracker(on_error=self._on_error, **tracker_options)
        self.checkpoint = checkpoint
        self.lines = self.blank = self.bad = self.skipped = 0
        self.unsent: list[int] = []  # lines whose events failed for a passing reason
        self.settled = 0  # every line up to it is settled in this run
        self.pending: collections.deque[tuple[asyncio.Task[None], _Chunk]] = collections.deque()
        self.lost_track = False  # an event that could not be traced to its line
        self.interrupted = asyncio.Event()
        self.hurried = False
        self.closing: asyncio.Future[None] | None = None
        self.position = 0  # bytes read
        self.eof = False  # the input was read to its end
        self.consumed = 0  # lines read from it (some not tracked yet if interrupted)
        self._written = 0.0

    # -- delivery results --------------------------------------------------------------

    def _on_error(self, error: DeliveryError) -> None:
        lines: list[int] = []
        for event in error.events:
            key = _event_key(event)
            for _, chunk in self.pending:
                n = chunk.take_line(key)
                if n is not None:
                    lines.append(n)
                    break
            else:
                self.lost_track = True
        if len(lines) < len(error.events):
            _err(f"{len(error.events) - len(lines)} event(s) of unknown lines: {error}")
        if not lines:
            return
        if isinstance(error, (RejectedError, EncodeError)):  # the same again would fail
            _err(f"{_show(_ranges(lines))}: refused: {error}")
        else:
            self.unsent.extend(lines)
            _err(f"{_show(_ranges(lines))}: not delivered (--resume sends them): {error}")

    def _advance(self, _: object = None) -> None:
        """Drop the chunks whose events are all settled; checkpoint now and then."""
        pending = self.pending
        while pending and pending[0][0].done():
            barrier, chunk = pending.popleft()
            if barrier.cancelled() or barrier.exception() is not None:
                self.lost_track = True
            if not self.lost_track and not self.tracker.stats.dropped:
                self.settled = chunk.last
        now = time.monotonic()
        if now - self._written >= CHECKPOINT_EVERY:
            self._written = now
            self.checkpoint.write(self.settled, self.unsent)

    # -- reading -----------------------------------------------------------------------

    async def read(self, source: IO[bytes], progress: _Progress) -> None:
        tracker = self.tracker
        loop = asyncio.get_running_loop()
        interrupted = loop.create_task(self.interrupted.wait())
        try:
            while not self.interrupted.is_set():
                read = await asyncio.to_thread(source.readlines, 1 << 20)
                if not read:
                    self.eof = True
                    break
                self.position += sum(map(len, read))
                self.consumed += len(read)
                if self.lines == 0 and read[0].startswith(_BOM):
                    read[0] = read[0][3:]
                for start in range(0, len(read), CHUNK_LINES):
                    self._track(read[start : start + CHUNK_LINES])
                    progress.update(self.position, self.lines, tracker.stats.delivered)
                    while self.pending and self.lines - self.pending[0][1].first >= WINDOW:
                        oldest = self.pending[0][0]  # wait for it to settle: memory bound
                        await asyncio.wait(
                            {oldest, interrupted}, return_when=asyncio.FIRST_COMPLETED
                        )
                        if self.interrupted.is_set():
                            return
                        self._advance()
                        progress.update(self.position, self.lines, tracker.stats.delivered)
        finally:
            interrupted.cancel()

    def _track(self, raw_lines: list[bytes]) -> None:
        """Track the events of these lines (the next ones), then put a barrier after them."""
        tracker = self.tracker
        chunk = _Chunk(self.lines + 1, raw_lines)
        untracked = chunk.untracked
        done = self.checkpoint.skips(chunk)
        if done:
            untracked.update(done)
            self.skipped += len(done)
        n = self.lines
        if done is not None and len(done) == len(raw_lines):  # all done by a previous run
            raw_lines = []
            n = chunk.last
        for raw in raw_lines:
            n += 1
            if done and n in done:
                continue
            if not raw.strip():
                self.blank += 1
                untracked.add(n)
                continue
            reason = _send_line(tracker, raw)
            if reason is not None:
                self.bad += 1
                untracked.add(n)
                _err(f"line {n}: {reason}")
        self.lines = n
        barrier = asyncio.get_running_loop().create_task(tracker.flush())
        self.pending.append((barrier, chunk))
        barrier.add_done_callback(self._advance)

    # -- Ctrl-C ------------------------------------------------------------------------

    def interrupt(self) -> None:
        """First Ctrl-C: stop reading, deliver what was read. Second: stop now."""
        if not self.interrupted.is_set():
            self.interrupted.set()
            _err("lehnz-async: interrupted: sending what was read (Ctrl-C again: stop now)")
        elif not self.hurried:
            self.hurried = True
            _err("lehnz-async: stopping now")
            if self.closing is not None:
                # aclose() holds a first cancellation until its deadline; a second one
                # makes it settle what is left at once (reported, then re-sent on --resume)
                self.closing.cancel()
                asyncio.get_running_loop().call_soon(self.closing.cancel)

    async def close(self, timeout: float, progress: _Progress) -> None:
        """Settle everything tracked (within ``timeout``, or now if hurried)."""
        tracker = self.tracker
        self.closing = closing = asyncio.ensure_future(
            tracker.aclose(timeout=0.0 if self.hurried else timeout)
        )
        while not closing.done():
            await asyncio.wait({closing}, timeout=0.1)  # a redraw interval, not a sync
            progress.update(self.position, self.lines, tracker.stats.delivered)
        with contextlib.suppress(asyncio.CancelledError):
            await closing  # cancelled only by a second Ctrl-C, which the close obeyed
        for barrier, _ in self.pending:
            if not barrier.done():  # a closed tracker settled everything
                barrier.cancel()
        self.pending.clear()
        if not self.lost_track and not tracker.stats.dropped:
            self.settled = self.lines
        self.checkpoint.write(self.settled, self.unsent)


async def _send(
    source: IO[bytes],
    tracker_options: dict[str, Any],
    timeout: float,
    checkpoint: _Checkpoint,
    resume: bool,
) -> int:
    if resume:
        problem = checkpoint.load()
        if problem is not None:
            _err(f"lehnz-async: error: {problem}")
            return 2
    job = _Import(tracker_options, checkpoint)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows, not main thread
        loop.add_signal_handler(signal.SIGINT, job.interrupt)
    try:
        size = os.fstat(source.fileno()).st_size
    except (OSError, ValueError, io.UnsupportedOperation):
        size = 0
    progress = _Progress(size or None)
    try:
        try:
            await job.read(source, progress)
        finally:
            await job.close(timeout, progress)
    finally:
        progress.stop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    s = job.tracker.stats
    line, _, resend = checkpoint.state(job.settled, job.unsent)
    skipped = f" ({job.skipped} done before, skipped)" if job.skipped else ""
    print(f"read {job.lines} lines{skipped}: {s.tracked} events, {job.bad} bad, {job.blank} blank")
    print(f"delivered {s.delivered} of {s.tracked} (failed {s.failed}, dropped {s.dropped})")
    where = f"; checkpoint {checkpoint.path}" if checkpoint.path else ""
    print(f"done up to line {line} of {_line_count(source, job.consumed, job.eof, size)}{where}")
    again = "--resume" if checkpoint.path else "--checkpoint PATH (none was written)"
    if resend:
        undelivered = sum(b - a + 1 for a, b in resend)
        print(f"{undelivered} line(s) not delivered: {again} sends them again")
    if job.interrupted.is_set():
        print(f"interrupted: {again} continues after line {line}")
    if job.lost_track:
        print("warning: some events could not be traced to their lines; the checkpoint stopped")
    if job.interrupted.is_set():
        return 130
    complete = job.bad == 0 and s.delivered == s.tracked and not resend
    return 0 if complete else 1


def _stale_checkpoint(checkpoint: _Checkpoint, args: argparse.Namespace) -> bool:
    """Whether a checkpoint of an earlier run is there, with neither --resume nor
    --restart to say what to do with it (said on stderr)."""
    if args.resume or args.restart or checkpoint.path is None:
        return False
    if not os.path.exists(checkpoint.path):
        return False
    _err(
        f"lehnz-async: error: a checkpoint of an earlier run exists ({checkpoint.path}): "
        "--resume sends only what it did not deliver; --restart sends every line again "
        "(the server would store the events it delivered twice)"
    )
    return True


def _line_count(source: IO[bytes], read: int, eof: bool, size: int) -> str:
    """How many lines ``source`` has, ``read`` of them read, to its end (``eof``) or
    not: the rest of a file is counted (reading stopped early on Ctrl-C); what a pipe
    would still have sent is not known."""
    if eof:
        return str(read)
    if not size:
        return f"at least {read} (the input was not read to its end)"
    count, last = 0, b""
    try:
        while chunk := source.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk
    except (OSError, ValueError):
        return f"at least {read}"
    if last and not last.endswith(b"\n"):
        count += 1  # a last line without a newline
    return str(read + count)


def _raise_fd_limit(want: int = 4096) -> None:
    """Let the process hold ``want`` sockets (a soft limit of 1024 is common)."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def _serve(
    host: str, port: int, keep: int, client_timeout: float, allow_hosts: Sequence[str] = ()
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still interrupts
            loop.add_signal_handler(signum, stop.set)
    _raise_fd_limit()
    server = ReferenceServer(
        host=host,
        port=port,
        log_requests=True,
        keep=keep,  # memory stays bounded however long it runs
        keep_bodies=False,
        client_timeout=client_timeout,
        allow_hosts=allow_hosts,
    )
    async with server:
        print(f"listening on {server.url}", flush=True)
        print(f"api key: {server.api_key} (any well-formed lehnz_pk_... key)", flush=True)
        print(f"inspector: {server.inspector.url} (your events live, in a browser)", flush=True)
        await stop.wait()
        logging.getLogger("lehnz_async.testing").info("stopping")
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


_DESCRIPTION = """\
Tools around the Lehnz ingestion API: try the tracker against an in-process server
(demo), send the events of a JSONL file to an endpoint (send), or run the reference
ingestion server with its event inspector for local development (serve)."""

_SEND_EPILOG = f"""\
Each line of FILE is one event object, as track() takes it (user_id, event_name, ...).
Lines that are not valid events are reported by number and skipped. The checkpoint
records what was delivered, so that --resume after an interruption or a failure sends
only the rest. Exit status: 0 all delivered, 1 some not delivered (the reason is
printed), 2 unusable options or file, 130 interrupted.
Environment: {ENDPOINT_ENV} (the endpoint), LEHNZ_API_KEY (the key)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lehnz-async", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lehnz-async {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="track generated events against an in-process server, with an outage halfway",
        description="Track realistic generated events through a Tracker against the\n"
        "reference server in this process; take the server down halfway through, and\n"
        "print what was delivered, failed and lost, and what one track() call costs.",
        formatter_class=_Help,
    )
    demo.add_argument(
        "--events", type=_positive_int, default=100_000, metavar="N", help="events to track"
    )
    demo.add_argument("--seed", type=int, default=7, help="seed of the generated events")
    demo.add_argument(
        "--outage",
        type=float,
        default=OUTAGE_SECONDS,
        metavar="SECONDS",
        help="the server refuses connections this long halfway through (0: never)",
    )
    send = commands.add_parser(
        "send",
        help="send the events of a JSONL file ('-': stdin) to an ingestion endpoint",
        description="Send the events of a JSONL file to a Lehnz ingestion endpoint, in\n"
        "batches, with the tracker's retries and outage handling.",
        epilog=_SEND_EPILOG,
        formatter_class=_Help,
    )
    send.add_argument("file", metavar="FILE", help="a JSONL file of events; '-' reads stdin")
    send.add_argument(
        "--endpoint",
        default=os.environ.get(ENDPOINT_ENV) or DEFAULT_INGEST_URL,
        metavar="URL",
        help=f"the ingestion URL (default: ${ENDPOINT_ENV} if set, else %(default)s)",
    )
    send.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="your publishable key, lehnz_pk_... (default: $LEHNZ_API_KEY)",
    )
    send.add_argument(
        "--close-timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="after the last line, how long delivery may go on before what is left is "
        "given up (and left for --resume)",
    )
    send.add_argument(
        "--checkpoint",
        metavar="PATH",
        help=f"where to record how far the import got (default: FILE{CHECKPOINT_SUFFIX}; "
        "none for stdin)",
    )
    restart = send.add_mutually_exclusive_group()
    restart.add_argument(
        "--resume",
        action="store_true",
        help="skip the lines a previous run delivered (or reported bad), per the checkpoint",
    )
    restart.add_argument(
        "--restart",
        action="store_true",
        help="send every line again although a checkpoint exists (without --resume or "
        "--restart, an existing checkpoint stops send before it sends anything)",
    )
    serve = commands.add_parser(
        "serve",
        help="run the reference ingestion server and its event inspector",
        description="Run the reference ingestion server (the documented contract, exactly)\n"
        "and its event inspector, for local development: point a tracker's endpoint\n"
        "at the printed URL and open the inspector in a browser.",
        formatter_class=_Help,
    )
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="the port (0: any free port)")
    serve.add_argument(
        "--keep",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="events, requests and Idempotency-Keys remembered",
    )
    serve.add_argument(
        "--client-timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="for a request's body, and between requests on a connection",
    )
    serve.add_argument(
        "--allow-host",
        action="append",
        default=[],
        type=_host_name,
        metavar="NAME",
        help="a host name the inspector also answers to, beside localhost, 127.0.0.1, [::1] "
        "and --host (repeatable; any other Host header gets 403, against DNS rebinding)",
    )
    return parser


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each option's default in its help (unless it has none, or the help says it),
    and descriptions and epilogs laid out as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _host_name(text: str) -> str:
    try:
        return host_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status.

    Args:
        argv: The arguments, without the program name; None reads ``sys.argv``.

    Returns:
        0 on success, 1 if events were bad or not delivered, 2 for a usage error.
    """
    args = _parser().parse_args(argv)
    # The CLI reports delivery problems itself (on_error, summary): the library's
    # warnings would repeat them. The server's request log is the point of `serve`.
    serving = args.command == "serve"
    logging.basicConfig(
        level=logging.INFO if serving else logging.ERROR,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return asyncio.run(_demo(args.events, args.seed, args.outage))
        if serving:
            return asyncio.run(
                _serve(args.host, args.port, args.keep, args.client_timeout, args.allow_host)
            )
        options = {
            "api_key": resolve_api_key(args.api_key, "--api-key"),
            "endpoint": args.endpoint,
            "close_timeout": args.close_timeout,
        }
        if args.file == "-":
            if args.resume and args.checkpoint is None:
                _err("lehnz-async: error: --resume needs --checkpoint PATH when reading stdin")
                return 2
            checkpoint = _Checkpoint(args.checkpoint, "-")
            if _stale_checkpoint(checkpoint, args):
                return 2
            return asyncio.run(
                _send(sys.stdin.buffer, options, args.close_timeout, checkpoint, args.resume)
            )
        with open(args.file, "rb") as source:
            checkpoint = _Checkpoint(
                args.checkpoint or args.file + CHECKPOINT_SUFFIX, os.path.abspath(args.file)
            )
            if _stale_checkpoint(checkpoint, args):
                return 2
            return asyncio.run(_send(source, options, args.close_timeout, checkpoint, args.resume))
    except (ConfigurationError, OSError) as exc:
        _err(f"lehnz-async: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _err("lehnz-async: interrupted")
        return 130


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``lehnz-async`` script: `run` the arguments and exit with its status.

    Args:
        argv: The arguments, without the program name; None reads ``sys.argv``.
    """
    sys.exit(run(argv))
