"""How the cost per event grows with the backlog, the batch size and the producer threads.

    python benchmarks/scale.py [--repeats 3] [--json]

Each measurement is a fresh `Tracker` (its own loop thread: the producers are plain
threads, as in a WSGI app or a worker pool) sending to the loopback sink
(benchmarks/sink.py, a process of its own). A run tracks N events from T threads, each a
tight loop of ``track()`` with a fresh small context, then waits for ``flush_sync()``:

- ``track() µs``: the producers' wall time in ``track()`` loops, summed over threads,
  per event (contention for the GIL with the tracker's own thread shows here);
- ``CPU µs/event``: this process's CPU time (every thread: producers, the loop thread's
  cutting, encoding and sending) per event, from the first ``track()`` to the flush;
- ``events/s``: N over the wall time of the same span.

Three series vary one thing each, the others at the defaults (1 thread, batches of 500,
100,000 events): the backlog (10,000 to 1,000,000 events tracked before the flush), the
batch size (``max_batch_size`` 100 to 2,000) and the producer threads (1, 4, 16).
Medians of ``--repeats`` runs, alternated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

from drivers import LEHNZ_KEY, LEHNZ_PATH, running_sink

from lehnz_async import Tracker

SERIES: dict[str, list[dict[str, int]]] = {
    "backlog (events)": [{"events": n} for n in (10_000, 100_000, 1_000_000)],
    "max_batch_size": [{"batch": b} for b in (100, 500, 2_000)],
    "producer threads": [{"threads": t} for t in (1, 4, 16)],
}
DEFAULTS = {"events": 100_000, "batch": 500, "threads": 1}


def run(sink_url: str, events: int, batch: int, threads: int) -> dict[str, float]:
    tracker = Tracker(
        LEHNZ_KEY,
        endpoint=sink_url + LEHNZ_PATH,
        max_batch_size=batch,
        max_queue_size=max(events, batch),
        max_buffer_bytes=max(events, batch) * 1024,
    )
    tracker.track("warm", "view", context={"i": -1})
    tracker.flush_sync(timeout=30)
    per_thread = events // threads
    in_track: list[float] = []
    start = threading.Barrier(threads + 1)

    def produce(k: int) -> None:
        track = tracker.track
        users = [f"usr_{k}_{i % 1000}" for i in range(per_thread)]
        start.wait()
        t0 = time.perf_counter()
        for i, user in enumerate(users):
            track(user, "view", item_id="prod_7", context={"i": i, "k": k})
        in_track.append(time.perf_counter() - t0)

    workers = [threading.Thread(target=produce, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    cpu0 = time.process_time()
    start.wait()
    wall0 = time.perf_counter()
    for worker in workers:
        worker.join()
    receipt = tracker.flush_sync(timeout=120)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    tracker.close()
    n = per_thread * threads
    assert receipt.delivered == n, receipt
    return {
        "track_us": sum(in_track) / n * 1e6,
        "cpu_us": cpu / n * 1e6,
        "events_per_s": n / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {}
    with running_sink() as sink:
        cases = [(name, {**DEFAULTS, **case}) for name, cases in SERIES.items() for case in cases]
        runs: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(cases))}
        for _ in range(args.repeats):  # alternated: every case once per round
            for i, (_, case) in enumerate(cases):
                runs[i].append(run(sink.base_url, **case))
        for i, (name, case) in enumerate(cases):
            medians = {k: statistics.median(r[k] for r in runs[i]) for k in runs[i][0]}
            results.setdefault(name, []).append({**case, **medians})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name, rows in results.items():
        print(f"\n{name}")
        print("events     batch  threads  track() µs  CPU µs/event    events/s")
        for row in rows:
            print(
                f"{row['events']:>9,}  {row['batch']:>5}  {row['threads']:>7}  "
                f"{row['track_us']:>10.3f}  {row['cpu_us']:>12.2f}  {row['events_per_s']:>10,.0f}"
            )


if __name__ == "__main__":
    main()
