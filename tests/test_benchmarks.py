"""The benchmarks still run end to end, so that they cannot rot unnoticed.

None of these needs the peer SDKs of benchmarks/requirements.txt (CI installs only
``.[test]``); the one test that drives them is skipped where they are not installed.
"""

from __future__ import annotations

import gzip
import http.client
import importlib.util
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
COMPARE = BENCHMARKS / "compare.py"
DRIVERS = BENCHMARKS / "drivers.py"
SINK = BENCHMARKS / "sink.py"
EVENTS = 2000


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # The subprocess ends once its work is done (it stops its sink itself); the timeout
    # only turns a hang into a failure.
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _report(result: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import compare  # the report renders from the JSON, as main() prints it

    report: str = compare.format_report(result)
    return report


def _assert_delivered(run: dict[str, Any]) -> None:
    assert run["sink_final"]["events"] == run["events"] > 0  # every event, counted by the sink
    assert run["sink_final"]["rejected"] == 0
    assert run["library_failed"] == 0
    assert run["track_seconds"] > 0
    assert run["rss_peak_bytes"] >= run["rss_baseline_bytes"] > 0


def test_quick_run_of_lehnz_async_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = ["--events", str(EVENTS), "--repeats", "1", "--sink-seconds", "0.2"]
    proc = _run(str(COMPARE), "--quick", *sizes, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    raw, summary = result["raw"], result["summary"]

    (run,) = raw["scenario1"].pop("lehnz_async")
    assert not raw["scenario1"]  # lehnz_async alone
    _assert_delivered(run)
    assert run["events"] == EVENTS
    stats = run["tracker_stats"]  # the warm-up's events included
    assert stats["delivered"] == EVENTS + run["warmup"]
    assert stats["dropped"] == stats["failed"] == run["library_dropped"] == 0
    assert stats["batches"] >= EVENTS // 500
    for section in ("scenario2", "scaling", "latency"):  # --quick runs scenario 1 only
        assert not any(raw[section].values())
    figures = summary["scenario1"]["lehnz_async"]
    assert figures["track_us"]["median"] > 0
    assert figures["events_per_s"]["median"] > 0
    assert all(c["events_per_s"]["median"] > 0 for c in summary["capacity"].values())
    assert result["environment"]["cpu_count"] >= 1

    report = _report(result, monkeypatch)
    assert "Scenario 1" in report
    assert "Scenario 2" not in report


def test_comparison_smoke_run_without_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = _run(str(COMPARE), "--smoke", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    raw, summary = result["raw"], result["summary"]

    assert set(raw["scenario1"]) == {"lehnz_async", "ceiling", "naive"}
    for runs in raw["scenario1"].values():
        (run,) = runs
        _assert_delivered(run)
    assert raw["scenario1"]["lehnz_async"][0]["library_dropped"] == 0

    (default_queue,) = raw["scenario2"]["lehnz_async"]
    _assert_delivered(default_queue)
    assert default_queue["library_dropped"] == 0

    assert set(raw["scaling"]) == {"burst 2000", "paced 2000"}
    for (run,) in raw["scaling"].values():
        _assert_delivered(run)

    (latency,) = raw["latency"]["lehnz_async"]
    assert latency["latency_ns"]
    assert len(latency["idle_latency_ns"]) == 1000

    assert set(summary["ratios"]) == {"ceiling", "naive"}
    report = _report(result, monkeypatch)
    for title in ("Scenario 1", "Ratios", "Scenario 2", "Scaling", "Single-call latency"):
        assert title in report


# -- the sink counts every format it serves --------------------------------------------------


@pytest.fixture
def sink_url() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, str(SINK), "--exit-on-stdin-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line.startswith(b"READY "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def _request(
    url: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def test_sink_counts_the_events_of_each_format(sink_url: str) -> None:
    key = {"X-API-KEY": "lehnz_pk_test"}
    posthog_body = _json({"batch": [{"event": "view"}] * 4, "api_key": "phc_x", "sent_at": "t"})
    zipped = gzip.compress(posthog_body)
    # posthog.AsyncPosthog's body (posthog/_async_request.py, _serialize_v0_body)
    async_body = {"batch": [{}] * 2, "historical_migration": False, "sent_at": "t", "api_key": "k"}
    accepted = [  # (path, body, headers, status, events)
        ("/api/v1/events/ingest", _json([{}, {"a": 1}]), key, 202, 2),
        ("/v1/batch", _json({"batch": [{}] * 3, "writeKey": "w", "sentAt": "t"}), {}, 200, 3),
        ("/batch/", posthog_body, {}, 200, 4),
        ("/batch/", zipped, {"Content-Encoding": "gzip"}, 200, 4),
        ("/batch/", _json(async_body), {}, 200, 2),
        ("/i/v0/e/", _json({"event": "view", "distinct_id": "u"}), {}, 200, 1),
        ("/i/v0/e/", _json({"batch": [{}, {}], "api_key": "phc_x"}), {}, 200, 2),
        ("/i/v0/e/", _json([{}, {}, {}]), {}, 200, 3),
    ]
    rejected = [
        ("/api/v1/events/ingest", _json([{}]), {}, 401),  # no key
        ("/api/v1/events/ingest", _json({"batch": [{}]}), key, 400),  # not an array
        ("/v1/batch", _json({"batch": [{}]}), {}, 400),  # no writeKey
        ("/batch/", _json([{}]), {}, 400),  # not PostHog's envelope
        ("/i/v1/analytics/events", _json({"batch": [{}]}), {}, 404),  # a path it does not serve
    ]
    for path, body, headers, status, _ in accepted:
        assert _request(sink_url, "POST", path, body, headers)[0] == status, path
    for path, body, headers, status in rejected:
        assert _request(sink_url, "POST", path, body, headers)[0] == status, path

    status, counts = _request(sink_url, "GET", "/count")
    assert status == 200
    assert counts["events"] == sum(case[4] for case in accepted)
    assert counts["requests"] == len(accepted)
    assert counts["rejected"] == len(rejected)
    assert counts["by_path"] == {
        "/api/v1/events/ingest": 2,
        "/v1/batch": 3,
        "/batch/": 10,
        "/i/v0/e/": 6,
    }
    # bytes as on the wire: the gzipped body counts compressed
    assert counts["bytes"] == sum(len(case[1]) for case in accepted)
    assert counts["header_bytes"] > 0


def test_sink_counts_header_bytes_exactly(sink_url: str) -> None:
    parts = urlsplit(sink_url)
    body = b"[{}]"
    head = (
        b"POST /api/v1/events/ingest HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"X-API-KEY: lehnz_pk_test\r\nContent-Length: 4\r\n\r\n"
    )
    with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=10) as sock:
        sock.sendall(head + body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 202")
    status, counts = _request(sink_url, "GET", "/count")
    assert status == 200
    assert (counts["events"], counts["bytes"], counts["header_bytes"]) == (1, 4, len(head))


@pytest.mark.parametrize(
    ("driver", "modules", "path"),
    [
        ("segment", ("segment",), "/v1/batch"),
        ("posthog", ("posthog",), "/batch/"),
        ("posthog_async", ("posthog", "httpx"), "/batch/"),
    ],
)
def test_peer_driver_delivers_through_the_sink(
    sink_url: str, driver: str, modules: tuple[str, ...], path: str
) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed (pip install -r benchmarks/requirements.txt)"
        )
    proc = _run(str(DRIVERS), driver, "--sink", sink_url, "--events", "300", "--warmup", "50")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    # the driver resets the sink after its warm-up: these are the 300 events of the burst
    assert result["sink_at_flush"]["events"] == 300
    assert result["sink_at_flush"]["by_path"] == {path: 300}
    assert result["sink_at_flush"]["rejected"] == 0
    assert result["library_failed"] == 0
