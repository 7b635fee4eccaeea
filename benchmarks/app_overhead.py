"""What tracking costs an app: a FastAPI service under load, with and without a tracker.

    python benchmarks/app_overhead.py              # every variant, K = 1 and 5 (~13 min)
    python benchmarks/app_overhead.py --quick      # none and lehnz_async, K = 1, 5 s windows
    python benchmarks/app_overhead.py --smoke      # ~10 s: the same, 2 s windows (what CI runs)

The app (`serve`) is a FastAPI service under uvicorn (uvloop and httptools when installed,
one worker) pinned to CPU 0; ``GET /product/{id}`` builds a 20-field response and tracks K
events with the variant's client: none, lehnz_async, Segment, PostHog (threaded) or
PostHog's ``AsyncPosthog``, each at its defaults, each sending to the loopback sink
(benchmarks/sink.py). The load generator (``wrk -c32``, or `loadgen`, a Python generator
in a process of its own when wrk is missing) and the sink are pinned to CPU 1.

Each run is a fresh app process: warm-up load, then a measured window (the app's CPU time
from /proc/PID/stat, requests/s and latency from the load generator, event-loop lag and
GC pauses from inside the app), then SIGTERM: the app closes its client in its lifespan
and the sink counts what arrived. Rounds alternate the variants (rotated by one each
round); each round has two runs of "none", against which the round's overheads are
computed. docs/app_overhead.md explains the figures and has a run.

Output: a markdown report on stdout (progress on stderr), every raw figure as JSON
(``--json``) and a bar chart of the CPU overhead (``--png``, matplotlib).

Diagnostics (each perturbs the app a little; compare its runs with each other only):
``--task-cpu`` times the steps of the client's own tasks on the app's loop (CPU time),
``--py-spy DIR`` samples each app's window with ``py-spy record --native``, and
``--candidate DIR`` adds a variant importing lehnz_async from ``DIR/lehnz_async`` (a
modified engine), alternated with the installed one. ``--from-json FILE`` prints the
report (and draws the chart) of an earlier run.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # drivers.py, when run as a script or imported by a test

from drivers import LEHNZ_KEY, LEHNZ_PATH, SinkClient, git_commit, running_sink  # noqa: E402

LIBRARIES = ("lehnz_async", "segment", "posthog", "posthog_async")
VARIANTS = ("none", *LIBRARIES)
#: lehnz_async imported from the directory given with --candidate (a modified engine,
#: run alternately with the installed one): an A/B of an engine change
CANDIDATE = "candidate"
#: Modules each variant needs (the peers are in benchmarks/requirements.txt only).
REQUIRES = {
    "none": (),
    "lehnz_async": (),
    "segment": ("segment",),
    "posthog": ("posthog",),
    "posthog_async": ("posthog", "httpx"),
    CANDIDATE: (),
}
APP_CPU, LOAD_CPU = 0, 1
EVENT_NAMES = ("view", "click", "view", "add_to_cart", "view", "purchase")
LAG_INTERVAL = 0.005  # the loop-lag monitor's sleep, seconds
LAG_LIMIT = 0.010  # a lag over this is counted ("lags > 10 ms")
PNG = ROOT / "docs" / "images" / "app_overhead.png"


class Options(NamedTuple):
    """What to run (the command-line options)."""

    seconds: float = 20.0  # measured window per run
    warmup: float = 3.0  # load before the window, not measured
    rounds: int = 3
    variants: tuple[str, ...] = VARIANTS
    ks: tuple[int, ...] = (1, 5)
    connections: int = 32
    loadgen: str = "auto"  # auto (wrk if on PATH), wrk, python
    nones: int = 2  # runs of "none" per round
    check: bool = False  # exit 1 if a check fails (else the failures are only printed)
    py_spy: str | None = None  # a directory: py-spy samples each app during its window
    task_cpu: bool = False  # time the steps of the client's own tasks (a diagnostic)
    candidate: str | None = None  # a directory holding a modified lehnz_async/ (A/B)


DEFAULTS = Options()
QUICK = Options(
    seconds=5.0, rounds=1, variants=("none", "lehnz_async"), ks=(1,), nones=1, check=True
)
SMOKE = QUICK._replace(seconds=2.0, warmup=0.0)  # no timing is asserted: no warm-up


# == the app (`serve`, a process of its own) ==================================================


def pin(cpu: int) -> bool:
    """Pin this process (and the threads it starts later) to ``cpu``; False if it cannot
    (a machine with one CPU, or no sched_setaffinity)."""
    try:
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError, ValueError):
        return False
    return True


class Monitor:
    """The app's in-process figures: event-loop lag (a task sleeping `LAG_INTERVAL` and
    measuring how late it wakes) and GC collections and pauses (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.reset()
        self._gc_started = self._gc_cpu_started = 0.0

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.requests = 0  # /product requests answered
        #: wall time in the K tracking calls of each of those requests, ns
        self.track_ns = array.array("q")
        #: CPU ns in the steps of the client's own tasks on the app's loop (--task-cpu)
        self.task_cpu_ns: dict[str, int] = {}
        self.task_steps: dict[str, int] = {}
        self.lag_samples = 0
        self.lag_max = 0.0
        self.lag_sum = 0.0
        #: (seconds since reset, lag) of each lag over LAG_LIMIT
        self.lags: list[tuple[float, float]] = []
        #: lags by bucket, upper bounds in ms (the last is everything above 50 ms)
        self.lag_hist = [0] * 7
        self.gc_count = [0, 0, 0]
        self.gc_pause = [0.0, 0.0, 0.0]  # seconds
        self.gc_max = [0.0, 0.0, 0.0]
        #: the same in the thread's CPU time: a pause's wall time includes any moment
        #: another process had the CPU, which on a shared machine can be most of it
        self.gc_cpu = [0.0, 0.0, 0.0]
        self.gc_cpu_max = [0.0, 0.0, 0.0]
        self.gc_collected = [0, 0, 0]
        #: (start since reset, seconds, generation) of each collection over 1 ms, and of
        #: every gen-1 and gen-2 collection
        self.gc_long: list[tuple[float, float, int, float]] = []

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now, cpu_now = time.perf_counter(), time.thread_time()
        if phase == "start":
            self._gc_started, self._gc_cpu_started = now, cpu_now
            return
        gen, pause = info["generation"], now - self._gc_started
        cpu = cpu_now - self._gc_cpu_started
        self.gc_cpu[gen] += cpu
        self.gc_cpu_max[gen] = max(self.gc_cpu_max[gen], cpu)
        self.gc_count[gen] += 1
        self.gc_pause[gen] += pause
        self.gc_collected[gen] += info.get("collected", 0)
        self.gc_max[gen] = max(self.gc_max[gen], pause)
        if (pause > 0.001 or gen) and len(self.gc_long) < 20_000:
            self.gc_long.append((self._gc_started - self.started, pause, gen, cpu))

    async def watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        bounds = (0.001, 0.002, 0.005, 0.010, 0.020, 0.050)
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_INTERVAL)
            lag = loop.time() - before - LAG_INTERVAL
            self.lag_samples += 1
            self.lag_sum += lag
            self.lag_max = max(self.lag_max, lag)
            self.lag_hist[sum(lag > b for b in bounds)] += 1
            if lag > LAG_LIMIT and len(self.lags) < 10_000:
                self.lags.append((time.perf_counter() - self.started - lag, lag))

    def figures(self) -> dict[str, Any]:
        # a lag "overlaps GC" if a collection ran in its window (start - interval, end)
        gc_windows = [(start, start + pause) for start, pause, _, _ in self.gc_long]
        with_gc = sum(
            any(s < t + lag and e > t - LAG_INTERVAL for s, e in gc_windows) for t, lag in self.lags
        )
        return {
            "seconds": time.perf_counter() - self.started,
            "requests": self.requests,
            **_track_figures(sorted(self.track_ns)),
            "task_cpu_ns": self.task_cpu_ns,
            "task_steps": self.task_steps,
            "lag_samples": self.lag_samples,
            "lag_max_ms": self.lag_max * 1000,
            "lag_mean_ms": self.lag_sum / self.lag_samples * 1000 if self.lag_samples else 0.0,
            "lags_over_10ms": len(self.lags),
            "lags_over_10ms_with_gc": with_gc,
            "lag_hist": self.lag_hist,
            "lags": self.lags[:2000],
            "gc_collections": self.gc_count,
            "gc_pause_ms": [p * 1000 for p in self.gc_pause],
            "gc_max_ms": [p * 1000 for p in self.gc_max],
            "gc_cpu_ms": [p * 1000 for p in self.gc_cpu],
            "gc_cpu_max_ms": [p * 1000 for p in self.gc_cpu_max],
            "gc_collected": self.gc_collected,
            "gc_long": self.gc_long[:2000],
            "gc_threshold": gc.get_threshold(),
            "gc_tracked_objects": len(gc.get_objects()),
        }


def _track_figures(durations: Sequence[int]) -> dict[str, float]:
    """The tracking calls' wall time per request (sorted ns): its median is what a call
    costs; the mean includes the rare slow ones (a full batch, preemption by another
    process); the mean below the 99th percentile leaves preemption out."""
    if not durations:
        return {"track_median_us": 0.0, "track_mean_us": 0.0, "track_trimmed_us": 0.0}
    p99 = _pct(durations, 99)
    kept = [d for d in durations if d <= p99]
    return {
        "track_median_us": _pct(durations, 50) / 1000,
        "track_mean_us": sum(durations) / len(durations) / 1000,
        "track_trimmed_us": sum(kept) / len(kept) / 1000,
        "track_p99_us": p99 / 1000,
    }


class Client:
    """One variant's tracking client in the app: ``track(user_id, name, item_id, position)``
    queues one event; ``start`` and ``close`` run in the app's lifespan."""

    tracked = 0  # calls made
    refused = 0  # calls the library refused at once (its queue full)
    errors = 0  # events reported to on_error

    def __init__(self, sink_url: str) -> None:
        self.sink_url = sink_url

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def track(self, user_id: str, name: str, item_id: str, position: int) -> None: ...

    def stats(self) -> dict[str, Any]:
        return {}

    def on_error(self, error: Exception, batch: Any = None) -> None:
        self.errors += len(batch) if batch is not None else len(getattr(error, "events", ()))


class NoClient(Client):
    pass


class LehnzClient(Client):
    async def start(self) -> None:
        from lehnz_async import Tracker

        self.tracker = Tracker(
            LEHNZ_KEY, endpoint=self.sink_url + LEHNZ_PATH, on_error=self.on_error
        )
        await self.tracker.start()
        self._track = self.tracker.track

    def track(self, user_id: str, name: str, item_id: str, position: int) -> None:
        self._track(user_id, name, item_id=item_id, context={"position": position, "page": "pdp"})

    async def close(self) -> None:
        await self.tracker.aclose()

    def stats(self) -> dict[str, Any]:
        import lehnz_async

        stats: dict[str, Any] = self.tracker.stats._asdict()
        self.refused = stats["dropped"]
        return {**stats, "imported_from": str(Path(lehnz_async.__file__).parent)}


class SegmentClient(Client):
    async def start(self) -> None:
        from segment.analytics import Client as Segment

        self.client = Segment("bench_write_key", host=self.sink_url, on_error=self.on_error)

    def track(self, user_id: str, name: str, item_id: str, position: int) -> None:
        properties = {"item_id": item_id, "position": position, "page": "pdp"}
        ok, _ = self.client.track(user_id, name, properties)
        if not ok:
            self.refused += 1

    async def close(self) -> None:
        self.client.shutdown()  # flush (queue.join), then join its consumer thread


class PostHogClient(Client):
    client_class = "Posthog"

    async def start(self) -> None:
        import posthog

        client_type = getattr(posthog, self.client_class)
        # capture_mode="v0": its default, made explicit (as benchmarks/drivers.py does)
        self.client = client_type(
            "phc_bench", host=self.sink_url, on_error=self.on_error, capture_mode="v0"
        )

    def track(self, user_id: str, name: str, item_id: str, position: int) -> None:
        properties = {"item_id": item_id, "position": position, "page": "pdp"}
        if self.client.capture(name, distinct_id=user_id, properties=properties) is None:
            self.refused += 1

    async def close(self) -> None:
        self.client.shutdown()


class PostHogAsyncClient(PostHogClient):
    client_class = "AsyncPosthog"

    async def close(self) -> None:
        await self.client.shutdown()


CLIENTS: dict[str, type[Client]] = {
    "none": NoClient,
    "lehnz_async": LehnzClient,
    "segment": SegmentClient,
    "posthog": PostHogClient,
    "posthog_async": PostHogAsyncClient,
    CANDIDATE: LehnzClient,
}


def time_client_tasks(
    loop: asyncio.AbstractEventLoop, monitor: Monitor, lehnz: bool = False
) -> None:
    """``--task-cpu``: the tasks the client starts on the app's loop (lehnz_async's flusher
    and sender workers, AsyncPosthog's consumers) become pure-Python tasks whose every step
    is timed with ``time.thread_time_ns()``, by the function their coroutine runs, less
    any garbage collection that ran meanwhile (counted with GC). The client's work on the
    loop outside its tasks' steps (aiohttp's protocol callbacks, timers) is not counted;
    the pure-Python task adds a few µs per step. With ``lehnz``, lehnz_async's freezes,
    calls on the loop, are timed too."""
    clients = ("lehnz_async", "posthog", "segment")

    class TimedTask(asyncio.tasks._PyTask):  # type: ignore[name-defined,misc]
        def _Task__step(self, exc: BaseException | None = None) -> None:
            started, gc_before = time.thread_time_ns(), sum(monitor.gc_cpu)
            try:
                super()._Task__step(exc)  # type: ignore[misc]
            finally:
                # a collection that ran during the step is counted as GC, not here
                gc_ns = round((sum(monitor.gc_cpu) - gc_before) * 1e9)
                spent = time.thread_time_ns() - started - gc_ns
                monitor.task_cpu_ns[self._timed] = monitor.task_cpu_ns.get(self._timed, 0) + spent
                monitor.task_steps[self._timed] = monitor.task_steps.get(self._timed, 0) + 1

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        code = getattr(coro, "cr_code", None)
        if code is not None and code.co_name == "_run_coro":  # anyio 4.16's TaskHandle
            inner = getattr(coro.cr_frame.f_locals.get("self"), "_coro", None)
            code = getattr(inner, "cr_code", code)
        where = code.co_filename if code is not None else ""
        if not any(f"/{name}/" in where for name in clients):
            return asyncio.Task(coro, loop=loop, **kwargs)
        task = TimedTask(coro, loop=loop, **kwargs)
        name = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11+
        task._timed = f"{where.rsplit('/', 2)[-2]}.{name}"
        return task

    loop.set_task_factory(factory)
    if lehnz:
        _time_freezes(monitor)


def _time_freezes(monitor: Monitor) -> None:
    """lehnz_async's freezes (issue 19) are calls on the loop, not steps of a task: time
    them too, the same way, as ``lehnz_async.Flusher.freeze``."""
    import importlib

    flusher = importlib.import_module("lehnz_async._flusher").Flusher
    freeze = getattr(flusher, "freeze", None)
    if freeze is None:  # an engine from before freezing
        return

    def timed(self: Any) -> None:
        started, gc_before = time.thread_time_ns(), sum(monitor.gc_cpu)
        try:
            freeze(self)
        finally:
            gc_ns = round((sum(monitor.gc_cpu) - gc_before) * 1e9)
            key = "lehnz_async.Flusher.freeze"
            spent = time.thread_time_ns() - started - gc_ns
            monitor.task_cpu_ns[key] = monitor.task_cpu_ns.get(key, 0) + spent
            monitor.task_steps[key] = monitor.task_steps.get(key, 0) + 1

    flusher.freeze = timed


def build_app(
    client: Client, k: int, monitor: Monitor, report: Path, task_cpu: bool = False
) -> Any:
    """The FastAPI app: ``GET /product/{id}`` and the benchmark's own endpoints."""
    from fastapi import FastAPI

    started: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        gc.callbacks.append(monitor.on_gc)
        watcher = asyncio.create_task(monitor.watch_loop())
        if task_cpu:
            time_client_tasks(
                asyncio.get_running_loop(), monitor, lehnz=isinstance(client, LehnzClient)
            )
        await client.start()
        try:
            yield
        finally:
            # SIGTERM: uvicorn stops accepting, finishes the requests in hand, then runs
            # this; it re-raises the signal afterwards, so nothing runs after the report
            started["shutdown"] = time.perf_counter()
            tracked = client.tracked
            await client.close()
            closed = time.perf_counter()
            watcher.cancel()
            result = {
                "tracked": tracked,
                "close_seconds": closed - started["shutdown"],
                "errors": client.errors,
                "library_stats": client.stats(),
                "refused": client.refused,
            }
            report.write_text(json.dumps(result))  # noqa: ASYNC240 (at shutdown, once)

    app = FastAPI(lifespan=lifespan)
    counter = iter(range(1 << 62))
    perf_counter_ns = time.perf_counter_ns

    @app.get("/product/{product_id}")
    async def product(product_id: int, user: str = "usr_anon") -> dict[str, Any]:
        item = f"prod_{product_id:05d}"
        response = {
            "id": product_id,
            "sku": item,
            "name": f"Product {product_id}",
            "brand": "Lehnz",
            "category": "kitchen",
            "subcategory": "knives",
            "price": 19.99 + product_id % 100,
            "currency": "EUR",
            "in_stock": product_id % 7 != 0,
            "stock": product_id % 50,
            "rating": 3.5 + product_id % 15 / 10,
            "reviews": product_id % 900,
            "description": "A sharp, balanced chef's knife for everyday cooking.",
            "tags": ["steel", "chef", f"series-{product_id % 9}"],
            "images": [f"/img/{item}/{n}.jpg" for n in range(3)],
            "dimensions": {"length_mm": 330, "width_mm": 50, "weight_g": 210},
            "seller": {"id": product_id % 40, "name": "Lehnz Store"},
            "created_at": "2024-03-01T12:00:00Z",
            "updated_at": "2025-01-15T08:30:00Z",
            "related": [product_id + 1, product_id + 2, product_id + 3],
        }
        n = next(counter)
        started = perf_counter_ns()
        for j in range(k):
            client.track(user, EVENT_NAMES[(n + j) % 6], item, (n + j) % 20)
        monitor.track_ns.append(perf_counter_ns() - started)
        monitor.requests += 1
        client.tracked += k
        return response

    @app.get("/_bench/ready")
    async def ready() -> dict[str, Any]:
        return {"pid": os.getpid()}

    @app.post("/_bench/reset")
    async def reset() -> dict[str, Any]:
        monitor.reset()
        return {"tracked": client.tracked}

    @app.get("/_bench/stats")
    async def stats() -> dict[str, Any]:
        return {"tracked": client.tracked, "refused": client.refused, **monitor.figures()}

    return app


def serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="app_overhead.py serve")
    parser.add_argument("--variant", choices=(*VARIANTS, CANDIDATE), required=True)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--cpu", type=int, default=APP_CPU)
    parser.add_argument("--task-cpu", action="store_true", help="time the client's tasks")
    args = parser.parse_args(argv)
    pinned = pin(args.cpu)

    import uvicorn

    loop, http = server_stack()
    monitor = Monitor()
    client = CLIENTS[args.variant](args.sink)
    app = build_app(client, args.k, monitor, args.report, args.task_cpu)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=args.port,
        loop=loop,
        http=http,
        lifespan="on",
        access_log=False,
        log_level="warning",
        workers=1,
        backlog=1024,
    )
    print(f"serving {args.variant} K={args.k} ({loop}, {http}, pinned={pinned})", file=sys.stderr)
    uvicorn.Server(config).run()


def server_stack() -> tuple[str, str]:
    """uvicorn's loop and HTTP parser: uvloop and httptools when installed (uvicorn's
    ``[standard]``), else asyncio and h11 (what ``.[test]`` installs)."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


# == the Python load generator (`loadgen`, a process of its own) ==============================


async def _load(port: int, connections: int, seconds: float) -> dict[str, Any]:
    """``connections`` keep-alive connections, each sending the next GET as soon as the
    last answer is read, for ``seconds``; every latency recorded."""
    latencies: list[int] = []
    errors = {"connect": 0, "read": 0, "status": 0}
    deadline = time.perf_counter() + seconds
    counter = iter(range(1 << 62))
    perf_counter_ns = time.perf_counter_ns

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                n = next(counter)
                request = (
                    f"GET /product/{n % 5000}?user=usr_{n % 1000:05d} HTTP/1.1\r\n"
                    "Host: 127.0.0.1\r\n\r\n"
                ).encode()
                start = perf_counter_ns()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                latencies.append(perf_counter_ns() - start)
                if head[9:12] != b"200":
                    errors["status"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            errors["read"] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    results = await asyncio.gather(
        *(connection() for _ in range(connections)), return_exceptions=True
    )
    elapsed = time.perf_counter() - started
    errors["connect"] += sum(isinstance(r, BaseException) for r in results)
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": _pct(latencies, 50) / 1e6,
        "p90_ms": _pct(latencies, 90) / 1e6,
        "p99_ms": _pct(latencies, 99) / 1e6,
        "max_ms": latencies[-1] / 1e6 if latencies else float("nan"),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "tool": "python",
    }


def loadgen(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="app_overhead.py loadgen")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    result = asyncio.run(_load(args.port, args.connections, args.seconds))
    print(json.dumps(result), flush=True)


# == the orchestrator ==========================================================================

WRK_SCRIPT = """
local n = 0
request = function()
  n = n + 1
  local user = string.format("usr_%05d", n % 1000)
  return wrk.format("GET", "/product/" .. (n % 5000) .. "?user=" .. user)
end
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(out: str) -> dict[str, Any]:
    """The figures of ``wrk --latency``'s report."""
    percentiles = dict(re.findall(r"^[ \t]+(\d+)%[ \t]+(\S+)[ \t]*$", out, re.M))
    total = re.search(r"^[ \t]+(\d+) requests in ([\d.]+)(\w+),", out, re.M)
    rate = re.search(r"^Requests/sec:[ \t]+([\d.]+)", out, re.M)
    latency = re.search(r"^[ \t]+Latency[ \t]+(\S+)[ \t]+(\S+)[ \t]+(\S+)", out, re.M)
    if not (percentiles and total and rate and latency):
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    kinds: dict[str, int] = {}
    if socket_errors:
        names = ("connect", "read", "write", "timeout")
        kinds = dict(zip(names, map(int, socket_errors.groups()), strict=True))
    kinds["status"] = int(non2xx[1]) if non2xx else 0
    return {
        "requests": int(total[1]),
        "seconds": _ms(total[2] + total[3]) / 1000,
        "requests_per_s": float(rate[1]),
        "p50_ms": _ms(percentiles["50"]),
        "p90_ms": _ms(percentiles["90"]),
        "p99_ms": _ms(percentiles["99"]),
        "max_ms": _ms(latency[3]),
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
        "tool": "wrk",
    }


def _pin_load() -> None:  # preexec_fn of the load generator and the sink
    pin(LOAD_CPU)


class Load:
    """Runs the load generator: wrk if chosen and on PATH, else `loadgen`."""

    def __init__(self, kind: str, connections: int, workdir: Path) -> None:
        wrk = shutil.which("wrk")
        if kind == "wrk" and wrk is None:
            raise SystemExit(
                "wrk is not on PATH (Debian: apt-get install wrk); try --loadgen python"
            )
        self.wrk = wrk if kind in ("auto", "wrk") else None
        self.connections = connections
        self.script = workdir / "product.lua"
        self.script.write_text(WRK_SCRIPT)

    @property
    def name(self) -> str:
        return "wrk" if self.wrk else "python"

    def run(self, port: int, seconds: float) -> dict[str, Any]:
        if self.wrk:
            duration = max(1, round(seconds))
            cmd = [self.wrk, "-t1", f"-c{self.connections}", f"-d{duration}s", "--latency"]
            cmd += ["--timeout", "10s", "-s", str(self.script), f"http://127.0.0.1:{port}"]
        else:
            cmd = [sys.executable, __file__, "loadgen", "--port", str(port)]
            cmd += ["--connections", str(self.connections), "--seconds", str(seconds)]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            preexec_fn=_pin_load,  # the orchestrator starts no threads
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {proc.stderr[-2000:]}")
        if self.wrk:
            return parse_wrk(proc.stdout)
        result: dict[str, Any] = json.loads(proc.stdout)
        return result


def pinned_sink() -> contextlib.AbstractContextManager[SinkClient]:
    """benchmarks/sink.py, pinned to `LOAD_CPU`; stopped by closing its stdin."""
    return running_sink(preexec_fn=_pin_load)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _http(method: str, url: str, timeout: float = 10) -> dict[str, Any]:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


CLOCK_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of process ``pid`` (utime + stime, every thread, from /proc/PID/stat),
    its main thread's (on-CPU ns from /proc/PID/task/PID/schedstat), and context switches
    summed over its live threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after "pid (comm)": state is fields[0]; utime, stime are the 14th, 15th of the line
    utime, stime = int(fields[11]), int(fields[12])
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        # on CPU, and runnable but waiting for the CPU (taken by other processes), in ns
        main_ns, main_wait_ns = map(int, f.read().split()[:2])
    voluntary = involuntary = threads = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/status") as f:
            threads += 1
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    involuntary += int(line.split()[1])
    return {
        "cpu_s": (utime + stime) / CLOCK_TICK,
        "user_s": utime / CLOCK_TICK,
        "system_s": stime / CLOCK_TICK,
        "main_thread_s": main_ns / 1e9,
        "main_thread_wait_s": main_wait_ns / 1e9,
        "voluntary_switches": voluntary,
        "involuntary_switches": involuntary,
        "threads": threads,
    }


@contextlib.contextmanager
def sampled(pid: int, opts: Options, name: str) -> Iterator[str | None]:
    """With ``--py-spy DIR``: ``py-spy record --native`` of the app for the window, in
    py-spy's raw (collapsed stacks) format, pinned to the load's CPU. It stops the app for
    each sample (--native needs it), which costs the app time: the figures of a sampled
    run are not comparable with an unsampled one; the shares of its samples are what
    counts."""
    if opts.py_spy is None:
        yield None
        return
    out = Path(opts.py_spy) / f"{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    beside = Path(sys.executable).with_name("py-spy")  # pip install py-spy, in this venv
    exe = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if exe is None:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    cmd = [exe, "record", "--native", "--format", "raw", "--rate", "200"]
    cmd += ["--duration", str(max(1, round(opts.seconds))), "--pid", str(pid), "-o", str(out)]
    spy = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_pin_load
    )
    try:
        yield str(out)
    finally:
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def run_app(
    sink: SinkClient, load: Load, variant: str, k: int, opts: Options, workdir: Path
) -> dict[str, Any]:
    """One app process: warm-up, the measured window, SIGTERM; its figures."""
    port, report = free_port(), workdir / f"report-{variant}-{k}-{time.monotonic_ns()}.json"
    base = f"http://127.0.0.1:{port}"
    sink.reset()
    cmd = [sys.executable, __file__, "serve", "--variant", variant, "--k", str(k)]
    cmd += ["--sink", sink.base_url, "--port", str(port), "--report", str(report)]
    cmd += ["--cpu", str(APP_CPU)] + (["--task-cpu"] if opts.task_cpu else [])
    env = {n: v for n, v in os.environ.items() if not n.startswith(("POSTHOG_", "LEHNZ_"))}
    if variant == CANDIDATE:
        assert opts.candidate is not None
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [opts.candidate, env.get("PYTHONPATH")]))
    with tempfile.TemporaryFile(dir=workdir) as log:
        app = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        result: dict[str, Any] = {"variant": variant, "k": k, "pid": app.pid}
        try:
            deadline = time.monotonic() + 60
            while True:
                if app.poll() is not None:
                    raise RuntimeError("the app exited before it answered")
                try:
                    _http("GET", base + "/_bench/ready", timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            if opts.warmup > 0:
                result["warmup"] = load.run(port, opts.warmup)
            _http("POST", base + "/_bench/reset")
            before = proc_cpu(app.pid)
            with sampled(app.pid, opts, f"{variant}-k{k}-{port}") as profile:
                result["load"] = load.run(port, opts.seconds)
            if profile:
                result["py_spy"] = profile
            after = proc_cpu(app.pid)
            result["cpu"] = {key: after[key] - before[key] for key in after if key != "threads"}
            result["threads"] = after["threads"]
            result["inside"] = _http("GET", base + "/_bench/stats")
            result["sink_before_sigterm"] = sink.counts()["events"]
            stop = time.perf_counter()
            app.send_signal(signal.SIGTERM)
            app.wait(timeout=120)
            result["exit_seconds"] = time.perf_counter() - stop
            result["returncode"] = app.returncode
            result["shutdown"] = json.loads(report.read_text()) if report.exists() else None
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read()[-3000:].decode("utf-8", "replace"))
            raise
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()
    counts = sink.counts()
    result["sink_final"] = {key: counts[key] for key in ("events", "requests", "rejected")}
    return result


def rotated(items: Sequence[Any], r: int) -> list[Any]:
    k = r % len(items) if items else 0
    return [*items[k:], *items[:k]]


def plan(opts: Options) -> list[tuple[str, int]]:
    """One round's runs: ``nones`` of "none" spread among (library, K)."""
    variants = [*opts.variants, *([CANDIDATE] if opts.candidate else [])]
    libs = [(v, k) for k in opts.ks for v in variants if v != "none"]
    if "none" not in opts.variants:
        return libs
    runs: list[tuple[str, int]] = []
    step = max(1, math.ceil(len(libs) / opts.nones)) if libs else 1
    for i in range(opts.nones):
        runs += [("none", 0), *libs[i * step : (i + 1) * step]]
    return runs


def measure(opts: Options, progress: Callable[[str], None]) -> dict[str, Any]:
    missing = {
        v: [m for m in REQUIRES[v] if importlib.util.find_spec(m) is None] for v in opts.variants
    }
    missing = {v: m for v, m in missing.items() if m}
    if missing:
        raise SystemExit(
            "not installed: "
            + "; ".join(f"{v} needs {', '.join(m)}" for v, m in missing.items())
            + " (pip install -r benchmarks/requirements.txt, or --variants)"
        )
    pin(LOAD_CPU)  # the orchestrator mostly waits; keep it off the app's CPU
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, pinned_sink() as sink:
        workdir = Path(tmp)
        load = Load(opts.loadgen, opts.connections, workdir)
        progress(f"load generator: {load.name}; app: uvicorn with {', '.join(server_stack())}")
        for r in range(opts.rounds):
            for variant, k in rotated(plan(opts), r):
                res = run_app(sink, load, variant, k, opts, workdir)
                res["round"] = r
                runs.append(res)
                f = run_figures(res)
                progress(
                    f"[{time.perf_counter() - started:6.0f} s] round {r + 1}, {variant} K={k}: "
                    f"{f['cpu_ms_per_1k']:.0f} ms CPU/1k req, {f['requests_per_s']:,.0f} req/s, "
                    f"p99 {f['p99_ms']:.1f} ms, lag max {f['lag_max_ms']:.1f} ms, "
                    f"delivered {f['delivered']:,}/{f['tracked']:,}"
                )
    return {
        "runs": runs,
        "seconds": time.perf_counter() - started,
        "load_generator": load.name,
        "server": dict(zip(("loop", "http"), server_stack(), strict=True)),
    }


# -- figures ----------------------------------------------------------------------------------


def _pct(sorted_values: Sequence[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = math.ceil(p / 100 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, rank))]


def run_figures(res: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run."""
    load, cpu, inside = res["load"], res["cpu"], res["inside"]
    shutdown = res["shutdown"] or {}
    requests = max(load["requests"], 1)
    tracked = shutdown.get("tracked", inside["tracked"])
    delivered = res["sink_final"]["events"]
    return {
        "cpu_ms_per_1k": cpu["cpu_s"] / requests * 1e6,
        "main_thread_ms_per_1k": cpu["main_thread_s"] / requests * 1e6,
        # the app's loop was runnable but another process had CPU 0: the machine's noise
        "cpu_wait_percent": cpu["main_thread_wait_s"] / load["seconds"] * 100,
        "system_ms_per_1k": cpu["system_s"] / requests * 1e6,
        "cpu_busy_percent": cpu["cpu_s"] / load["seconds"] * 100,
        "switches_per_1k": (cpu["voluntary_switches"] + cpu["involuntary_switches"])
        / requests
        * 1000,
        "requests_per_s": load["requests_per_s"],
        "p50_ms": load["p50_ms"],
        "p99_ms": load["p99_ms"],
        "max_ms": load["max_ms"],
        "load_errors": load["errors"],
        "lag_max_ms": inside["lag_max_ms"],
        "lags_over_10ms": inside["lags_over_10ms"],
        "lags_over_10ms_with_gc": inside["lags_over_10ms_with_gc"],
        "gc_collections": inside["gc_collections"],
        "gc_pause_ms": inside["gc_pause_ms"],
        "gc_max_ms": inside["gc_max_ms"],
        "gc_pause_ms_per_1k": sum(inside["gc_pause_ms"]) / requests * 1000,
        "gc_cpu_ms": inside.get("gc_cpu_ms", inside["gc_pause_ms"]),
        "gc_cpu_max_ms": inside.get("gc_cpu_max_ms", inside["gc_max_ms"]),
        "gc_cpu_ms_per_1k": sum(inside.get("gc_cpu_ms", inside["gc_pause_ms"])) / requests * 1000,
        # the K tracking calls of a request, timed in the handler (wall time)
        "track_median_us": inside.get("track_median_us", float("nan")),
        "track_trimmed_us": inside.get("track_trimmed_us", float("nan")),
        # CPU in the client's own tasks on the app's loop (--task-cpu only)
        "task_cpu_ms_per_1k": sum(inside.get("task_cpu_ns", {}).values())
        / max(inside.get("requests", requests), 1)
        / 1000,
        "tracked": tracked,
        "delivered": delivered,
        "delivered_percent": delivered / tracked * 100 if tracked else 100.0,
        "delivered_after_sigterm": delivered - res["sink_before_sigterm"],
        "refused": shutdown.get("refused", 0),
        "library_errors": shutdown.get("errors", 0),
        "close_seconds": shutdown.get("close_seconds", float("nan")),
        "exit_seconds": res["exit_seconds"],
        "threads": res["threads"],
    }


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def analyse(raw: dict[str, Any]) -> dict[str, Any]:
    """Per (variant, K): each figure's median [min-max] over the rounds; overheads are
    computed against the median of the same round's "none" runs."""
    runs = raw["runs"]
    none_cpu: dict[int, list[float]] = {}
    for res in runs:
        if res["variant"] == "none":
            none_cpu.setdefault(res["round"], []).append(run_figures(res)["cpu_ms_per_1k"])
    none_rps: dict[int, list[float]] = {}
    for res in runs:
        if res["variant"] == "none":
            none_rps.setdefault(res["round"], []).append(run_figures(res)["requests_per_s"])
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for res in runs:
        f = run_figures(res)
        r = res["round"]
        if res["variant"] != "none" and r in none_cpu:
            f["cpu_overhead_percent"] = (
                f["cpu_ms_per_1k"] / statistics.median(none_cpu[r]) - 1
            ) * 100
            f["rps_change_percent"] = (
                f["requests_per_s"] / statistics.median(none_rps[r]) - 1
            ) * 100
        for gen in range(3):
            f[f"gc{gen}_collections"] = f["gc_collections"][gen]
            f[f"gc{gen}_pause_ms"] = f["gc_pause_ms"][gen]
            f[f"gc{gen}_max_ms"] = f["gc_max_ms"][gen]
            f[f"gc{gen}_cpu_ms"] = f["gc_cpu_ms"][gen]
            f[f"gc{gen}_cpu_max_ms"] = f["gc_cpu_max_ms"][gen]
        groups.setdefault((res["variant"], res["k"]), []).append(f)
    summary = []
    for (variant, k), figures in groups.items():
        keys = [key for key, v in figures[0].items() if isinstance(v, (int, float))]
        row: dict[str, Any] = {"variant": variant, "k": k, "runs": len(figures)}
        for key in keys:
            values = [f[key] for f in figures if key in f]
            if values:
                row[key] = summarize(values)
        summary.append(row)
    order = {v: i for i, v in enumerate((*VARIANTS, CANDIDATE))}
    summary.sort(key=lambda row: (row["variant"] != "none", row["k"], order[row["variant"]]))
    return {"rows": summary}


# -- the report -------------------------------------------------------------------------------


def _cell(s: dict[str, float] | None, fmt: str, signed: bool = False) -> str:
    if not s:
        return "-"

    def f(x: float) -> str:
        text = fmt.format(x)
        return ("+" + text if x >= 0 else text.replace("-", "\N{MINUS SIGN}")) if signed else text

    if len(f(s["min"])) and f(s["min"]) == f(s["max"]):
        return f(s["median"])
    return f"{f(s['median'])} [{f(s['min'])}…{f(s['max'])}]"


def format_report(result: dict[str, Any]) -> str:
    rows, setup = result["summary"]["rows"], result["setup"]
    lines = [
        "## What tracking costs an app",
        "",
        f"FastAPI {setup['fastapi']} under uvicorn {setup['uvicorn']} "
        f"({setup['server']['loop']}, {setup['server']['http']}, 1 worker) on CPU {APP_CPU}; "
        f"load: {setup['load_generator']} -c{setup['options']['connections']} and the sink on "
        f"CPU {LOAD_CPU}; {setup['options']['seconds']:g} s windows after "
        f"{setup['options']['warmup']:g} s of warm-up, {setup['options']['rounds']} alternated "
        f"round(s); commit {setup['commit']}, Python {setup['python']}, "
        f"{setup['cpu_count']} CPUs. Medians [min…max] over the rounds; overheads against the "
        "same round's untracked app.",
        "",
        "| variant | K | app CPU ms / 1k req | CPU overhead | requests/s | req/s change "
        "| p50 ms | p99 ms | loop lag max ms | lags > 10 ms | delivered | after SIGTERM "
        "| close s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        delivered = _cell(row["delivered_percent"], "{:.1f}%")
        lines.append(
            "| "
            + " | ".join(
                [
                    row["variant"],
                    "-" if row["variant"] == "none" else str(row["k"]),
                    _cell(row["cpu_ms_per_1k"], "{:.0f}"),
                    _cell(row.get("cpu_overhead_percent"), "{:.0f}%", signed=True),
                    _cell(row["requests_per_s"], "{:,.0f}"),
                    _cell(row.get("rps_change_percent"), "{:.0f}%", signed=True),
                    _cell(row["p50_ms"], "{:.1f}"),
                    _cell(row["p99_ms"], "{:.1f}"),
                    _cell(row["lag_max_ms"], "{:.1f}"),
                    _cell(row["lags_over_10ms"], "{:.0f}"),
                    "-" if row["variant"] == "none" else delivered,
                    "-"
                    if row["variant"] == "none"
                    else _cell(row["delivered_after_sigterm"], "{:,.0f}"),
                    "-" if row["variant"] == "none" else _cell(row["close_seconds"], "{:.2f}"),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Where the time goes (medians): the tracking calls in the handler, the client's own "
        "tasks on the loop (`--task-cpu` runs only), garbage collection in CPU time (wall "
        "time in brackets: it includes preemption by other processes), and per generation "
        "the collections in the window; CPU ms; the longest, CPU ms:",
        "",
        "| variant | K | tracking calls µs / req | client tasks CPU ms / 1k req "
        "| GC CPU ms / 1k req (wall) | gen 0 | gen 1 | gen 2 | lags > 10 ms during GC "
        "| main thread ms / 1k req | waited for CPU 0 | context switches / 1k req | threads "
        "| refused at call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        gens = [
            f"{row[f'gc{g}_collections']['median']:.0f}; {row[f'gc{g}_cpu_ms']['median']:.1f}; "
            f"{row[f'gc{g}_cpu_max_ms']['median']:.1f}"
            for g in range(3)
        ]
        tasks = row.get("task_cpu_ms_per_1k")
        gc_cpu, gc_wall = row["gc_cpu_ms_per_1k"]["median"], row["gc_pause_ms_per_1k"]["median"]
        lines.append(
            "| "
            + " | ".join(
                [
                    row["variant"],
                    "-" if row["variant"] == "none" else str(row["k"]),
                    _cell(row.get("track_median_us"), "{:.2f}"),
                    _cell(tasks, "{:.2f}") if tasks and tasks["max"] > 0 else "-",
                    f"{gc_cpu:.2f} ({gc_wall:.2f})",
                    *gens,
                    _cell(row["lags_over_10ms_with_gc"], "{:.0f}"),
                    _cell(row["main_thread_ms_per_1k"], "{:.0f}"),
                    _cell(row["cpu_wait_percent"], "{:.1f}%"),
                    _cell(row["switches_per_1k"], "{:.0f}"),
                    _cell(row["threads"], "{:.0f}"),
                    _cell(row["refused"], "{:,.0f}"),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "App CPU: utime + stime of the app process (every thread) over the window, from "
        "/proc/PID/stat, per 1,000 requests answered. Delivered: events the sink counted "
        "after the app exited (SIGTERM; the client closed in the lifespan) ÷ events tracked, "
        "warm-up included; after SIGTERM: those that arrived between the signal and the exit. "
        "Waited for CPU 0: the share of the window the app's loop thread was runnable while "
        "another process had its CPU (/proc/PID/task/PID/schedstat): the machine's noise.",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["summary"]["rows"] if r["variant"] != "none"]
    ks = sorted({r["k"] for r in rows})
    libs = [v for v in (*LIBRARIES, CANDIDATE) if any(r["variant"] == v for r in rows)]
    labels = {
        "lehnz_async": "lehnz_async",
        "segment": "Segment",
        "posthog": "PostHog",
        "posthog_async": "PostHog async",
        CANDIDATE: "candidate",
    }
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    width = 0.8 / max(len(ks), 1)
    for i, k in enumerate(ks):
        xs, ys, lo, hi, texts = [], [], [], [], []
        for x, lib in enumerate(libs):
            row = next((r for r in rows if r["variant"] == lib and r["k"] == k), None)
            if row is None or "cpu_overhead_percent" not in row:
                continue
            s = row["cpu_overhead_percent"]
            xs.append(x + (i - (len(ks) - 1) / 2) * width)
            ys.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
            delivered = row["delivered_percent"]["median"]
            late = f"\n{delivered:.0f}% delivered" if delivered < 99.95 else ""
            texts.append(f"{s['median']:+.0f}%{late}")
        bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"K = {k} event(s)/request")
        ax.bar_label(bars, labels=texts, padding=2, fontsize=7)
    ax.set_xticks(range(len(libs)), [labels[v] for v in libs])
    ax.set_ylabel("app CPU per request vs. no tracking (%)")
    ax.axhline(0, color="black", linewidth=0.8)
    setup = result["setup"]
    ax.set_title(
        f"What tracking costs a FastAPI app (median, min\N{EN DASH}max of "
        f"{setup['options']['rounds']} rounds; commit {setup['commit']})",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def check(result: dict[str, Any]) -> list[str]:
    """What must hold in any run: the load got answers, and lehnz_async delivered every
    event it tracked."""
    problems = []
    for res in result["raw"]["runs"]:
        f, what = run_figures(res), f"round {res['round'] + 1}, {res['variant']} K={res['k']}"
        if res["load"]["requests"] == 0 or f["load_errors"]:
            problems.append(
                f"{what}: {res['load']['requests']} requests, errors {res['load']['error_kinds']}"
            )
        if res["shutdown"] is None:
            problems.append(f"{what}: the app wrote no shutdown report")
        if res["variant"] in ("lehnz_async", CANDIDATE) and (
            f["tracked"] == 0 or f["delivered"] != f["tracked"] or f["library_errors"]
        ):
            problems.append(f"{what}: tracked {f['tracked']}, delivered {f['delivered']}")
        if res["sink_final"]["rejected"]:
            problems.append(f"{what}: the sink rejected {res['sink_final']['rejected']}")
    return problems


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    if argv[:1] == ["loadgen"]:
        return loadgen(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--seconds", type=float, help=f"measured window per run (default {DEFAULTS.seconds:g})")
    add("--warmup", type=float, help=f"load before each window (default {DEFAULTS.warmup:g})")
    add("--rounds", type=int, help=f"alternated rounds (default {DEFAULTS.rounds})")
    add("--variants", help=f"comma-separated, of {','.join(VARIANTS)} (default all)")
    add("--ks", help="events tracked per request, comma-separated (default 1,5)")
    add("--connections", type=int, help="load generator connections (default 32)")
    add("--loadgen", choices=("auto", "wrk", "python"), help="default auto: wrk if on PATH")
    add("--quick", action="store_true", help="none and lehnz_async, K=1, one round, 5 s")
    add("--smoke", action="store_true", help="as --quick with 2 s windows; checks; no PNG")
    add("--json", type=Path, default=Path("app_overhead.json"), help="raw results (JSON)")
    add("--png", type=Path, default=PNG, help="the chart (default docs/images/app_overhead.png)")
    add("--no-plot", action="store_true", help="draw nothing (matplotlib not needed)")
    add("--py-spy", metavar="DIR", help="py-spy record each app's window into DIR (slows it)")
    add("--task-cpu", action="store_true", help="time the client's own tasks in the app")
    add("--from-json", type=Path, metavar="FILE", help="no run: the report (and chart) of FILE")
    add(
        "--candidate",
        metavar="DIR",
        help="also run lehnz_async imported from DIR/lehnz_async (a modified engine), "
        "alternately with the installed one",
    )
    args = parser.parse_args(argv)
    opts = SMOKE if args.smoke else QUICK if args.quick else DEFAULTS
    changes: dict[str, Any] = {
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "connections": args.connections,
        "loadgen": args.loadgen,
        "py_spy": args.py_spy,
        "task_cpu": args.task_cpu or None,
        "candidate": str(Path(args.candidate).resolve()) if args.candidate else None,
        "variants": tuple(args.variants.split(",")) if args.variants else None,
        "ks": tuple(int(k) for k in args.ks.split(",")) if args.ks else None,
    }
    opts = opts._replace(**{key: v for key, v in changes.items() if v is not None})
    unknown = set(opts.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # the app, the load generator and the sink are stopped

    signal.signal(signal.SIGTERM, interrupted)

    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        result["summary"] = analyse(result["raw"])  # figures added since are computed
        print(format_report(result))
        if not args.no_plot:
            plot(result, args.png)
            progress(f"chart: {args.png}")
        return None
    raw = measure(opts, progress)
    result = {
        "setup": {
            "options": opts._asdict(),
            "commit": git_commit(ROOT),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_generator": raw["load_generator"],
            "server": raw["server"],
            **{m: _version(m) for m in ("fastapi", "uvicorn", "uvloop", "httptools", "aiohttp")},
            "segment": _version("segment-analytics-python"),
            "posthog": _version("posthog"),
            "lehnz_async": _version("lehnz-async"),
        },
        "summary": analyse(raw),
        "raw": raw,
    }
    args.json.write_text(json.dumps(result, indent=1))
    print(format_report(result))
    progress(f"raw results: {args.json}")
    if not (args.no_plot or args.smoke) and any(v != "none" for v in opts.variants):
        if importlib.util.find_spec("matplotlib") is None:
            progress(
                "matplotlib is not installed: no chart (pip install -r benchmarks/requirements.txt)"
            )
        else:
            plot(result, args.png)
            progress(f"chart: {args.png}")
    problems = check(result)
    for problem in problems:
        progress(f"CHECK FAILED: {problem}")
    if problems and opts.check:
        sys.exit(1)
    return None


if __name__ == "__main__":
    main()
