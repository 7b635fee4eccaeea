"""The deterministic simulation suite (see tests/sim.py), and proof that it can fail."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from typing import Any

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lehnz_async import RetryPolicy, Tracker, _transport
from lehnz_async._backlog import Backlog
from lehnz_async._batch import new_key
from lehnz_async._sender import Sender

looptime = pytest.importorskip("looptime", reason="virtual time needs looptime 0.9 (Python 3.11+)")

from . import sim  # noqa: E402
from .sim import first_failing_seed  # noqa: E402

SEEDS = 2000


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    logging.disable(logging.CRITICAL)  # thousands of seeds' worth of warnings
    yield
    logging.disable(logging.NOTSET)


CHUNKS = 4  # so that pytest-xdist spreads the seeds over the cores


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_every_seed_loses_nothing_and_keeps_the_ledger(chunk: int) -> None:
    seeds = range(chunk * SEEDS // CHUNKS, (chunk + 1) * SEEDS // CHUNKS)
    started = time.perf_counter()
    failures = []
    totals = dict(requests=0, flushes=0, teardowns=0, spooled=0, failed=0, dropped=0)
    for seed in seeds:
        try:
            run = sim.run_seed(seed)
        except (AssertionError, TimeoutError) as exc:
            failures.append(f"seed {seed}: {exc!r:.300}\n  replay: {sim.replay_command(seed)}")
            continue
        stats = run.tracker.stats
        totals["requests"] += run.transport.requests
        totals["flushes"] += run.flushes_checked
        totals["teardowns"] += run.teardowns
        totals["spooled"] += stats.spooled
        totals["failed"] += stats.failed
        totals["dropped"] += stats.dropped
    elapsed = time.perf_counter() - started
    assert not failures, f"{len(failures)} of {len(seeds)} seeds failed:\n" + "\n".join(
        failures[:10]
    )
    print(f"seeds {seeds.start}-{seeds.stop - 1} in {elapsed:.1f} s: {totals}")
    # the schedule reaches every path it is meant to
    assert all(totals.values()), totals


def test_a_seed_does_the_same_thing_every_time() -> None:
    for seed in (3, 17, 123):
        first, second = sim.run_seed(seed), sim.run_seed(seed)
        assert first.tracker.stats == second.tracker.stats
        assert first.transport.requests == second.transport.requests
        assert first.server.stored == second.server.stored


# -- the suite catches the bugs it was built for, put back on purpose --------------------


def _old_error_message(body: bytes) -> str | None:
    """0.1's: only msgspec.DecodeError was caught; a Latin-1 page raised."""
    if not body:
        return None
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return body[:300].decode("utf-8").strip() or None


async def _stranding_worker(self: Sender) -> None:
    """0.1's: a worker that drops a batch it failed on without settling it."""
    while (batch := await self._take()) is not None:
        with contextlib.suppress(Exception):
            await self._attempts(batch, False)
        if not batch.settled and batch.state == "sending":
            self.backlog.sending.remove(batch)  # neither settled nor kept: stranded
        self.freed.set()


def test_the_simulation_catches_a_batch_stranded_by_an_undecodable_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_transport, "error_message", _old_error_message)
    monkeypatch.setattr(Sender, "worker", _stranding_worker)
    found = first_failing_seed(range(300))
    assert found is not None, "no seed noticed stranded batches"


def test_the_simulation_catches_a_requeued_batch_that_changes_its_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requeue = Backlog.requeue

    def requeue_with_new_keys(self: Backlog) -> None:
        requeue(self)
        for batch in self.ready:
            batch.key = new_key()  # 0.1: re-queued events were cut anew, new key

    monkeypatch.setattr(Backlog, "requeue", requeue_with_new_keys)
    found = first_failing_seed(range(SEEDS))
    assert found is not None, "no seed noticed a batch stored twice"
    assert "stored twice" in str(found[1])


# -- the same model, driven by Hypothesis ------------------------------------------------


class TrackerMachine(RuleBasedStateMachine):
    """Random interleavings of track, identify, producer threads, faults, flush, time and
    aclose, on virtual time, against the model server; the ledger identity is checked
    after every step and the full accounting at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.sim = sim.Sim(0)
        self.sim.transport.faults = {}
        self.sim.tracker = Tracker._simulated(
            self.sim.transport,
            rng=random.Random(0),
            spool=self.sim.spool,
            max_batch_size=5,
            flush_interval=0.5,
            retry=RetryPolicy(max_attempts=4, max_time=5.0, base_delay=0.05, max_delay=1.0),
            close_timeout=3.0,
            on_error=self.sim.errors,
        )
        self.loop = looptime.new_event_loop(noop_cycles=1)
        self.closed = False
        self.run(self.sim.tracker.start())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 3600))

    @rule(n=st.integers(1, 30))
    def track(self, n: int) -> None:
        async def go() -> None:
            self.sim.track_some(n)

        self.run(go())

    @rule(n=st.integers(1, 50))
    def producer_thread(self, n: int) -> None:
        tracker, first = self.sim.tracker, self.sim.next_id
        self.sim.next_id += n

        def produce() -> None:
            for i in range(first, first + n):
                tracker.track(f"usr_{i}", "click", item_id="p", context={"id": i})

        thread = threading.Thread(target=produce)
        thread.start()
        thread.join()
        self.sim.tracked.extend(range(first, first + n))

    @rule(
        kind=st.sampled_from(["reset", "timeout", "429", "5xx", "lost"]),
        p=st.sampled_from([0.0, 0.3, 1.0]),
    )
    def faults(self, kind: str, p: float) -> None:
        self.sim.transport.faults = {kind: p} if p else {}

    @rule(seconds=st.sampled_from([0.0, 0.1, 1.0, 10.0]))
    def advance(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds))

    @precondition(lambda self: not self.closed)
    @rule(cancel_after=st.sampled_from([None, 0.001, 0.5]))
    def flush(self, cancel_after: float | None) -> None:
        if cancel_after is None:
            self.sim.transport.faults = {}  # a flush that must return
            self.run(self.sim.flush_once())
        else:
            self.run(self.sim.cancelled_flush(cancel_after))

    @precondition(lambda self: not self.closed)
    @rule()
    def aclose(self) -> None:
        self.run(self.sim.close())
        self.closed = True

    @invariant()
    def ledger_adds_up(self) -> None:
        self.sim.check_ledger()

    def teardown(self) -> None:
        try:
            if not self.closed:
                self.run(self.sim.tracker.aclose())
            self.sim.check_final()
        finally:
            sim._tear_down(self.loop)


TrackerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
test_tracker_machine = TrackerMachine.TestCase
