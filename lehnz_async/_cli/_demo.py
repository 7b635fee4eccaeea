"""`lehnz-async demo`: realistic generated events through a Tracker against the reference
server in this process, with an outage halfway."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from .._config import DEFAULT_MAX_QUEUE_SIZE
from .._exceptions import (
    DeliveryError,
)
from .._tracker import Tracker
from ..testing import ReferenceServer
from ._output import _err

CHUNK = 5_000  # track() calls between two yields to the loop, so the flusher sends
_FUNNEL = {  # event kind -> weight, roughly the proportions of a shop's traffic
    "view": 48, "search": 14, "click": 20, "add_to_cart": 8, "remove_from_cart": 2,
    "checkout_start": 3, "purchase": 2, "custom": 2, "identify": 1,
}  # fmt: skip
_CUSTOM = (("wishlist_add", "engagement"), ("banner_impression", "exposure"))
_QUERIES = ("running shoes", "rain jacket", "backpack", "socks", "water bottle")
Call = tuple[Callable[..., None], tuple[Any, ...], dict[str, Any]]


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
