"""The byte budget under a burst: 100,000 events with 10 KB contexts, the endpoint down.

    .venv/bin/python benchmarks/budget.py [--events 100000] [--context-bytes 10000]

The tracker runs at its defaults (``max_buffer_bytes`` 128 MiB) against a loopback port
where nothing listens, so nothing can be sent. It tracks the burst twice, each in a fresh
process: with ``track()`` in a loop that never yields (the buffer must hold the budget
on its own, from track()'s slow path), and with ``await atrack()`` bounded by a timeout
(it must wait, not drop). It prints the peak RSS over the process's baseline, the stats,
and the drops by reason.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def child(mode: str, n: int, size: int) -> None:
    from lehnz_async import Tracker

    url = f"http://127.0.0.1:{free_port()}/api/v1/events/ingest"  # nothing listens
    tracker = Tracker("lehnz_pk_bench", endpoint=url, close_timeout=0.5)
    await tracker.start()
    base = rss_mb()
    pad = "x" * size
    if mode == "track":
        for i in range(n):
            tracker.track(
                f"usr_{i % 1000}", "view", item_id=f"p{i}", context={"blob": pad + str(i)}
            )
    else:
        waited = 0
        for i in range(n):
            try:
                await asyncio.wait_for(
                    tracker.atrack(f"usr_{i % 1000}", "view", context={"blob": pad + str(i)}), 0.05
                )
            except TimeoutError:
                waited += 1
                if waited >= 3:
                    break
    stats = tracker.stats
    print(
        f"{mode:>6}: tracked {stats.tracked:,}, queued {stats.queued:,}, in flight "
        f"{stats.in_flight:,}, dropped {stats.dropped:,} {stats.drops}, backlog "
        f"{stats.backlog_bytes / 2**20:.1f} MiB reckoned; RSS baseline {base:.1f} MB, peak "
        f"{peak_mb():.1f} MB (+{peak_mb() - base:.1f} MB over the baseline; budget "
        f"{128 * 1.048576:.1f} MB)",
        flush=True,
    )
    await tracker.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--context-bytes", type=int, default=10_000)
    parser.add_argument("--mode", choices=["track", "atrack"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        asyncio.run(child(args.mode, args.events, args.context_bytes))
        return
    for mode in ("track", "atrack"):
        subprocess.run(
            [sys.executable, __file__, "--mode", mode, "--events", str(args.events),
             "--context-bytes", str(args.context_bytes)],
            check=True, timeout=600,
        )  # fmt: skip


if __name__ == "__main__":
    main()
