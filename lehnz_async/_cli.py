"""The ``lehnz-async`` command: ``demo``, ``send`` and ``serve``; the only module that prints."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn

import msgspec

from .__about__ import __version__
from ._config import DEFAULT_INGEST_URL, DEFAULT_MAX_QUEUE_SIZE, ENDPOINT_ENV
from ._exceptions import ConfigurationError, DeliveryError, InvalidEventError
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


async def _demo(n: int, seed: int) -> int:
    errors: list[DeliveryError] = []
    async with ReferenceServer() as server:
        tracker = Tracker(server.api_key, endpoint=server.url, on_error=errors.append)
        calls = _demo_calls(tracker, n, seed)
        bar = _Bar(n)
        tracking = 0.0
        start = time.perf_counter()
        for first in range(0, n, CHUNK):
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
    print(f"{n / elapsed:,.0f} events/s end to end ({n} events in {elapsed:.3f} s)")
    print(f"one track() call: {tracking / n * 1e6:.2f} µs")
    for line in loop_lines:
        print(line)
    return 0 if s.delivered == n and received == n and loop_ok else 1


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


def _send_line(tracker: Tracker, raw: bytes) -> str | None:
    """Queue the event of one JSONL line; return why it is bad, or None."""
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        return f"not valid JSON ({exc})"
    if not isinstance(obj, dict):
        return f"not a JSON object but {_JSON_TYPES[type(obj)]}"
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}"
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


async def _send(source: IO[bytes], endpoint: str, api_key: str | None, timeout: float) -> int:
    def on_error(error: DeliveryError) -> None:
        for event in error.events[:3]:
            _err(f"failed: user_id={event.user_id} event_name={event.event_name}: {error}")
        if len(error.events) > 3:
            _err(f"failed: ... and {len(error.events) - 3} more: {error}")

    tracker = Tracker(api_key, endpoint=endpoint, on_error=on_error, close_timeout=timeout)
    lines = blank = bad = 0
    try:
        while chunk := await asyncio.to_thread(source.readlines, 1 << 20):
            for raw in chunk:
                lines += 1
                if not raw.strip():
                    blank += 1
                    continue
                reason = _send_line(tracker, raw)
                if reason is not None:
                    bad += 1
                    _err(f"line {lines}: {reason}")
            if tracker.stats.queued >= DEFAULT_MAX_QUEUE_SIZE // 2:  # never drop: wait
                await tracker.flush()
    finally:
        await tracker.aclose()
    s = tracker.stats
    print(f"read {lines} lines: {s.tracked} events, {bad} bad, {blank} blank")
    print(f"delivered {s.delivered} of {s.tracked} (failed {s.failed}, dropped {s.dropped})")
    return 0 if bad == 0 and s.delivered == s.tracked else 1


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


async def _serve(host: str, port: int, keep: int, client_timeout: float) -> int:
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
    )
    async with server:
        print(f"listening on {server.url}", flush=True)
        print(f"api key: {server.api_key} (any well-formed lehnz_pk_... key)", flush=True)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lehnz-async", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lehnz-async {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="track events against an in-process server")
    demo.add_argument("--events", type=_positive_int, default=100_000, metavar="N")
    demo.add_argument("--seed", type=int, default=7, help="of the generated events")
    send = commands.add_parser("send", help="send the events of a JSONL file ('-': stdin)")
    send.add_argument("file", metavar="FILE.jsonl")
    send.add_argument("--endpoint", default=os.environ.get(ENDPOINT_ENV) or DEFAULT_INGEST_URL)
    send.add_argument("--api-key", default=None, help="default: $LEHNZ_API_KEY")
    send.add_argument("--close-timeout", type=float, default=30.0, metavar="SECONDS")
    serve = commands.add_parser("serve", help="run the reference ingestion server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080, help="0: any free port")
    serve.add_argument(
        "--keep",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="events, requests and Idempotency-Keys remembered (default: %(default)s)",
    )
    serve.add_argument(
        "--client-timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="for a request's body, and between requests on a connection (default: %(default)s)",
    )
    return parser


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
            return asyncio.run(_demo(args.events, args.seed))
        if serving:
            return asyncio.run(_serve(args.host, args.port, args.keep, args.client_timeout))
        if args.file == "-":
            return asyncio.run(
                _send(sys.stdin.buffer, args.endpoint, args.api_key, args.close_timeout)
            )
        with open(args.file, "rb") as source:
            return asyncio.run(_send(source, args.endpoint, args.api_key, args.close_timeout))
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
