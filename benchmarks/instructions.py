"""Instructions per event, counted: a figure this shared machine's noise cannot move.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python benchmarks/instructions.py 100000

One process tracks N events through lehnz_async's `compare.py` driver and delivers them
to the loopback sink (a process of its own, not counted). callgrind counts the client's
instructions ("Collected"); run it again with N = 1000 and divide the difference by the
difference in events for the cost of one event, tracked and delivered, without the
interpreter's start-up. Counts repeat to within about 0.2% for the same code and
Python, whatever else the machine does, so an A/B of two commits (one checkout each, on
``PYTHONPATH``) resolves a 1% change that wall-clock runs here cannot.
"""

from __future__ import annotations

import asyncio
import sys

from drivers import DRIVER_TYPES, chunk_bounds, running_sink


async def deliver(n: int) -> None:
    with running_sink() as sink:
        driver = DRIVER_TYPES["lehnz_async"]()
        await driver.start(sink, n)
        driver.burst([driver.prepare(lo, hi) for lo, hi in chunk_bounds(n, 10)])
        await driver.flush()
        await driver.close()


if __name__ == "__main__":
    asyncio.run(deliver(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
