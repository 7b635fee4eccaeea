"""A Flask app with a module-level tracker, as the README shows for code without an event
loop, for ``gunicorn -k gevent``. tests/integrations/test_gevent.py serves it and stops it
with SIGTERM; the exit hook sends what each worker still holds.

Each worker measures its hub's lag two ways (a greenlet that measures how late its sleeps
wake, and gevent's monitor thread, turned on with ``GEVENT_MONITOR_THREAD_ENABLE``) and,
as it exits, writes one line ``lehnz-worker {json}`` to stderr."""

from __future__ import annotations

import atexit
import json
import os
import sys
import time

import gevent
import gevent.events
from flask import Flask, request

from lehnz_async import Tracker

TICK = 0.005  # the probe's sleep, in seconds

tracker = Tracker(flush_interval=float(os.environ.get("APP_FLUSH_INTERVAL", "1.0")))
app = Flask(__name__)


@app.get("/view/<item_id>")
def view(item_id: str) -> str:
    tracker.track(request.args["user"], "view", item_id=item_id)
    return "ok"


class HubLag:
    """The hub's lag, as a greenlet that sleeps sees it, and as gevent's monitor thread
    reports it (`EventLoopBlocked`: the hub ran one greenlet over max_blocking_time)."""

    def __init__(self) -> None:
        self.max_lag = 0.0
        self.ticks = 0
        self.blocked = 0  # reports about this (the main) hub
        self.longest_block = 0.0
        # gevent gives every OS thread that uses it a hub, each watched by the monitor:
        # the tracker's loop thread has one too, whose "blocks" hold up no request
        self.other_hubs_blocked = 0
        self.hub = gevent.get_hub()
        gevent.events.subscribers.append(self._on_event)
        gevent.spawn(self._probe)

    def _on_event(self, event: object) -> None:
        if isinstance(event, gevent.events.EventLoopBlocked):
            if event.hub is not self.hub:
                self.other_hubs_blocked += 1
                return
            self.blocked += 1
            self.longest_block = max(self.longest_block, event.blocking_time)
            if os.environ.get("APP_SHOW_BLOCKS"):
                sys.stderr.write("".join(event.info) + "\n")

    def _probe(self) -> None:
        while True:
            start = time.perf_counter()
            gevent.sleep(TICK)
            self.max_lag = max(self.max_lag, time.perf_counter() - start - TICK)
            self.ticks += 1


lag = HubLag()


@atexit.register  # plain atexit runs after lehnz_async's exit hook: the stats are final
def _report() -> None:
    stats = tracker.stats
    report = {
        "pid": os.getpid(),
        "tracked": stats.tracked,
        "delivered": stats.delivered,
        "failed": stats.failed,
        "dropped": stats.dropped,
        "max_lag": lag.max_lag,
        "ticks": lag.ticks,
        "blocked": lag.blocked,
        "longest_block": lag.longest_block,
        "tracker_hub_blocked": lag.other_hubs_blocked,
        "monitor": bool(gevent.config.monitor_thread),
    }
    sys.stderr.write(f"lehnz-worker {json.dumps(report)}\n")
    sys.stderr.flush()
