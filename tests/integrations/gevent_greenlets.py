"""A monkey-patched program that tracks from greenlets and then calls `flush_sync()` and
`close()` from greenlets, and leaves one tracker to the exit hook, while a probe greenlet
measures the hub's lag. Run by tests/integrations/test_gevent.py as
``python gevent_greenlets.py ENDPOINT API_KEY EVENTS SPOOL_DIR``; prints one JSON line."""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from lehnz_async import Tracker  # noqa: E402

TICK = 0.005  # the probe's sleep


class LagProbe:
    """A greenlet that sleeps TICK at a time and keeps how late it wakes."""

    def __init__(self) -> None:
        self.ticks = 0
        self.max_lag = 0.0
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            start = time.perf_counter()
            gevent.sleep(TICK)
            self.max_lag = max(self.max_lag, time.perf_counter() - start - TICK)
            self.ticks += 1


def main() -> None:
    endpoint, api_key, events, spool_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    probe = LagProbe()
    names = ("flush_sync", "close", "exit")
    trackers = {
        name: Tracker(
            api_key,
            endpoint=endpoint,
            flush_interval=60.0,  # what is sent, flush_sync(), close() or the exit hook sends
            spool_path=f"{spool_dir}/{name}.sqlite",
        )
        for name in names
    }

    def produce(name: str, worker: int) -> None:
        for i in range(events // 10):
            trackers[name].track(f"{name}_{worker}_{i}", "view", item_id="p1")
            if i % 25 == 0:
                gevent.sleep(0)  # a request handler would yield on its I/O

    for name in names:
        gevent.joinall([gevent.spawn(produce, name, w) for w in range(10)], raise_error=True)
    report: dict[str, object] = {}

    def timed(name: str, call: str) -> None:
        ticks = probe.ticks
        start = time.perf_counter()
        gevent.spawn(getattr(trackers[name], call), 10.0).get()
        stats = trackers[name].stats
        report[call] = {
            "seconds": time.perf_counter() - start,
            "probe_ticks": probe.ticks - ticks,  # > 0: the hub ran while it waited
            "tracked": stats.tracked,
            "delivered": stats.delivered,
        }

    timed("flush_sync", "flush_sync")
    timed("close", "close")
    trackers["flush_sync"].close(10.0)  # from the main greenlet this time
    report["main_close"] = {"closed": trackers["flush_sync"].closed}
    report["max_lag"] = probe.max_lag
    print(json.dumps(report), flush=True)
    # trackers["exit"] is left to the exit hook


main()
