"""The benchmark still runs end to end, so that it cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tracker.py"
EVENTS = 2000


def test_benchmark_runs_and_delivers_everything() -> None:
    # The subprocess ends once the benchmark is done (it stops its sink itself); the
    # timeout only turns a hang into a failure.
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--events",
            str(EVENTS),
            "--repeats",
            "1",
            "--sink-seconds",
            "0.5",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr

    result = json.loads(proc.stdout)
    (run,) = result["trackers"]["lehnz_async"]["runs"]
    assert run["events"] == EVENTS
    assert run["delivered"] == EVENTS  # counted by the sink
    assert run["tracker_delivered"] == EVENTS
    assert run["dropped"] == run["failed"] == 0
    assert run["batches"] >= EVENTS // 500
    assert run["track_us"] > 0
    assert run["events_per_s"] > 0
    assert result["sink_capacity"]["summary"]["events_per_s"]["median"] > 0
    assert result["environment"]["cpu_count"] >= 1
