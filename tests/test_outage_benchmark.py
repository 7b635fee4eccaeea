"""benchmarks/outage.py runs end to end, and lehnz_async at its defaults neither loses nor
drops an event through an outage of its sink (connections refused, then back).

Runs ``--smoke --no-peers``: lehnz_async alone (CI installs only ``.[test]``, not the peers
of benchmarks/requirements.txt), one 4 s outage, 1 s of traffic before and 3 s after, at
500 events/s, no plots (no matplotlib needed). About 10 s.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

OUTAGE = Path(__file__).resolve().parents[1] / "benchmarks" / "outage.py"
EVENTS = 500 * (1 + 4 + 3)  # 500 events/s for 1 s before, 4 s down, 3 s after


def test_smoke_run_loses_and_drops_nothing(tmp_path: Path) -> None:
    raw = tmp_path / "outage.json"
    args = ["--smoke", "--no-peers", "--no-plots", "--json-file", str(raw)]
    # The script stops its sink and producer itself; the timeout turns a hang into a failure.
    proc = subprocess.run(
        [sys.executable, str(OUTAGE), *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr

    # The report: one table, for the one outage, with one row: lehnz_async's.
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("Outage 4 s") for line in lines) == 1
    header = [line for line in lines if line.startswith("library ")]
    rows = [line for line in lines if line.startswith("lehnz_async ")]
    assert len(header) == len(rows) == 1
    assert not any(line.startswith(("segment ", "posthog ")) for line in lines)
    cells = dict(zip(re.split(r"\s{2,}", header[0]), re.split(r"\s{2,}", rows[0]), strict=True))
    assert cells["tracked"] == cells["delivered"] == f"{EVENTS:,}"
    assert cells["lost"] == cells["dropped"] == "0"
    assert cells["(queue full + gave up)"] == "0 + 0"
    assert cells["max in flight after 2 s"] in ("0", "1")  # outage mode: one probe at a time

    # The raw figures behind it.
    result = json.loads(raw.read_text())
    (run,) = result["outages"]
    assert run["outage"] == 4
    assert list(run["summary"]) == ["lehnz_async"]
    figures = run["summary"]["lehnz_async"]
    assert figures["tracked"] == figures["delivered"] == EVENTS  # unique seqs the sink saw
    assert figures["lost"] == figures["dropped"] == 0
    assert figures["undelivered_tracked_before_back"] == 0
    assert figures["rejected"] == 0
    assert figures["flushed"] and figures["closed"]
    assert figures["drain_seconds"] is not None
    assert 0 <= figures["drain_seconds"] < 15
    assert figures["requests_during_outage"] >= 1
    assert figures["outcomes_during_outage"] == {"closed": figures["requests_during_outage"]}
    assert figures["server_requests_during_outage"] == 0  # refused: nothing reached it
    stats = figures["lehnz_stats"]
    assert stats["tracked"] == stats["delivered"] == EVENTS
    assert stats["dropped"] == stats["failed"] == stats["queued"] == stats["in_flight"] == 0
    assert stats["outages"] == 1  # 4 s of refusals outlast the 2 s outage_grace
    assert stats["state"] == "healthy"
    # The socket-level count agrees with the tracker's own (its counter is read every
    # 10 ms, so an attempt at the very edge of the outage may fall on either side).
    assert abs(figures["lehnz_requests_during_outage"] - figures["requests_during_outage"]) <= 2
