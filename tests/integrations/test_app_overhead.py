"""benchmarks/app_overhead.py runs end to end: a FastAPI app under load, untracked and with
lehnz_async, and every event the app tracked reaches the sink after SIGTERM.

In tests/integrations: CI runs it once, in its first job. Runs ``--smoke``: none and
lehnz_async, K = 1, one round of 2 s windows, no warm-up (about 10 s). It needs only what
``.[test-core]`` installs (FastAPI, uvicorn): without uvloop and httptools the app runs on
asyncio and h11, and without ``wrk`` the benchmark's own Python load generator drives it.
No timing is asserted: figures on a shared machine say nothing about correctness; that
they were measured at all is checked.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
APP_OVERHEAD = BENCHMARKS / "app_overhead.py"

WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:41233
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.61ms    2.33ms  31.02ms   86.12%
    Req/Sec     4.28k   312.45     4.71k    80.00%
  Latency Distribution
     50%    7.27ms
     75%    8.09ms
     90%    9.48ms
     99%   16.73ms
  8559 requests in 2.00s, 9.91MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:   4274.51
Transfer/sec:      4.95MB
"""


def test_wrk_report_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import app_overhead

    figures = app_overhead.parse_wrk(WRK_OUTPUT)
    assert figures["requests"] == 8559
    assert figures["seconds"] == pytest.approx(2.0)
    assert figures["requests_per_s"] == pytest.approx(4274.51)
    assert figures["p50_ms"] == pytest.approx(7.27)
    assert figures["p99_ms"] == pytest.approx(16.73)
    assert figures["max_ms"] == pytest.approx(31.02)
    assert figures["error_kinds"] == {
        "connect": 0,
        "read": 2,
        "write": 0,
        "timeout": 1,
        "status": 3,
    }
    assert figures["errors"] == 6
    assert app_overhead.parse_wrk(WRK_OUTPUT.replace("7.27ms", "812.00us"))["p50_ms"] == 0.812


def test_smoke_run_delivers_every_event(tmp_path: Path) -> None:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:  # both are in .[test-core]; the Python load generator needs nothing else
        pytest.skip(f"{', '.join(missing)} not installed: the benchmark's app cannot run")
    raw = tmp_path / "app_overhead.json"
    # The script stops its app processes and its sink itself; the timeout turns a hang
    # into a failure.
    proc = subprocess.run(
        [sys.executable, str(APP_OVERHEAD), "--smoke", "--json", str(raw)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr  # --smoke exits 1 if a check failed

    result = json.loads(raw.read_text())
    runs = result["raw"]["runs"]
    assert [(r["variant"], r["k"]) for r in runs] == [("none", 0), ("lehnz_async", 1)]
    for run in runs:
        assert run["load"]["requests"] > 0
        assert run["load"]["errors"] == 0
        assert run["cpu"]["cpu_s"] > 0  # /proc/PID/stat was read around the window
        inside = run["inside"]
        assert inside["lag_samples"] > 0  # the loop-lag monitor ran
        assert len(inside["gc_collections"]) == len(inside["gc_pause_ms"]) == 3
        assert run["shutdown"] is not None  # the lifespan's shutdown wrote its report
        assert run["sink_final"]["rejected"] == 0

    none, lehnz = runs
    assert none["shutdown"]["tracked"] == none["sink_final"]["events"] == 0
    tracked = lehnz["shutdown"]["tracked"]
    # one event per request, warm-up included; each one delivered by the time the app
    # exited after SIGTERM, none reported as failed or dropped
    assert tracked >= lehnz["load"]["requests"] > 0
    assert lehnz["sink_final"]["events"] == tracked
    stats = lehnz["shutdown"]["library_stats"]
    assert stats["delivered"] == tracked
    assert stats["failed"] == stats["dropped"] == lehnz["shutdown"]["errors"] == 0

    (row,) = [r for r in result["summary"]["rows"] if r["variant"] == "lehnz_async"]
    assert "cpu_overhead_percent" in row  # against the same round's untracked app
    table = proc.stdout.splitlines()
    assert any(line.startswith("| none |") for line in table)
    assert any(line.startswith("| lehnz_async | 1 |") for line in table)
