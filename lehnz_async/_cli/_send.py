"""`lehnz-async send`: a bulk import with a checkpoint, a progress bar and Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import os
import signal
import sys
import time
from typing import IO, Any

import msgspec

from .._exceptions import (
    DeliveryError,
    EncodeError,
    RejectedError,
)
from .._marks import Receipt
from .._tracker import Tracker
from ._lines import (
    _BOM,
    CHECKPOINT_EVERY,
    CHUNK_LINES,
    WINDOW,
    _Chunk,
    _event_key,
    _ranges,
    _send_line,
    _show,
)
from ._output import _err


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
        self.pending: collections.deque[tuple[asyncio.Task[Receipt], _Chunk]] = collections.deque()
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
