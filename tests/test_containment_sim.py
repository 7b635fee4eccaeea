"""One part failing while the rest is healthy, on virtual time through the simulation
harness (tests/sim.py): a poison batch, a spool that cannot be read or written, a bug on
the probe path, a small byte budget. Each property is stated with a bound of virtual
time, and each of bugs 1-5 of issue 15 has a mutation test: put the bug back, and the
property fails. The same scenarios run over real HTTP in tests/test_containment.py."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from collections.abc import Iterator
from typing import Any

import pytest

from lehnz_async import RetriesExhaustedError, _attempts, _buffer, _flusher, _health, _sender
from lehnz_async._batch import EVENT_OVERHEAD

pytest.importorskip("looptime", reason="virtual time needs looptime 0.9 (Python 3.11+)")

from .sim import FaultySpool, Sim, first_failing_seed, run_seed, run_virtual, scripted

#: Virtual seconds within which an event that is not poison is delivered while the
#: destination accepts other batches (defaults: flush_interval 1 s, and a batch that
#: meets a poison event's 500 once retries after at most 0.1 s of backoff).
LIVENESS_BOUND = 3.0


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.ERROR)
    yield
    logging.disable(logging.NOTSET)


async def produce(sim: Sim, seconds: float, rate: int, poison_at: set[int]) -> None:
    """Track ``rate`` events a second for ``seconds``; the steps in ``poison_at`` track
    one poison event (the server answers 500 to any request holding it) instead."""
    for step in range(int(seconds * 10)):
        if step in poison_at:
            sim.track_some(1, plain=True, poison5xx=True)
            sim.track_some(rate // 10 - 1, plain=True)
        else:
            sim.track_some(rate // 10, plain=True)
        await asyncio.sleep(0.1)


def poison_run(**options: Any) -> Sim:
    """Defaults, 20 events/s for 40 s, a poison event at 1 s and another at 20 s."""
    sim = scripted(**options)

    async def main() -> None:
        async with sim.tracker:
            await produce(sim, 40.0, 20, {10, 200})
            await asyncio.sleep(120.0)  # the poison events run out of retries

    run_virtual(main)
    return sim


def late(sim: Sim) -> list[tuple[int, float]]:
    """Events not poison that were delivered later than the bound, or never."""
    at = sim.transport.delivered_at
    return [
        (i, at.get(i, float("inf")) - sim.tracked_at[i])
        for i in sim.tracked
        if i not in sim.poison5xx and at.get(i, float("inf")) - sim.tracked_at[i] > LIVENESS_BOUND
    ]


def test_a_poison_batch_delays_nothing_else_and_ends_in_on_error() -> None:
    """Bug 1: one batch the server always answers 500 while it accepts the others."""
    sim = poison_run()
    sim.check_final()
    stats = sim.tracker.stats
    assert late(sim) == []
    assert stats.outages == 0
    poisoned = [
        (type(error), [e.context["id"] for e in error.events])  # type: ignore[index]
        for error in sim.errors
    ]
    assert sorted(poisoned) == sorted((RetriesExhaustedError, [i]) for i in sim.poison5xx)
    assert stats.delivered == len(sim.tracked) - 2


def test_mutation_a_poison_batch_counted_as_an_outage_breaks_liveness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """0.2's rule put back: one batch's failures are evidence of an outage, and no
    bisection. The poison batch then holds everything else."""
    monkeypatch.setattr(_attempts.Attempts, "_poisoned", lambda self, part, outcome: False)
    failed = _health.Destination.failed

    def any_failure_is_evidence(self: Any, now: float, cause: str, root: int, **kw: Any) -> bool:
        kw["unreachable"] = True
        return failed(self, now, cause, root, **kw)

    monkeypatch.setattr(_health.Destination, "failed", any_failure_is_evidence)
    sim = poison_run()
    assert late(sim) or sim.tracker.stats.outages > 0


async def _outage(sim: Sim, seconds: float) -> None:
    sim.transport.down_kind = "reset"
    sim.transport.down_until = asyncio.get_running_loop().time() + seconds


def storage_run(spool: FaultySpool, **options: Any) -> Sim:
    """An outage of 30 s at 200 events/s that spills, then 30 s of healthy traffic."""
    sim = scripted(
        spool=spool,
        max_batch_bytes=20_000,
        max_buffer_bytes=100_000,
        max_batch_size=50,
        **options,
    )

    async def main() -> None:
        async with sim.tracker:
            await produce(sim, 1.0, 200, set())
            await _outage(sim, 30.0)
            await produce(sim, 30.0, 200, set())
            sim.recovered_at = asyncio.get_running_loop().time()  # type: ignore[attr-defined]
            await produce(sim, 30.0, 200, set())
            await asyncio.sleep(30.0)

    run_virtual(main)
    return sim


def delivered_after_recovery(sim: Sim) -> tuple[int, int]:
    """(events tracked once the outage ended, those of them delivered in the bound)."""
    start = sim.recovered_at + 15.0  # type: ignore[attr-defined]  # the backlog drained
    after = [i for i in sim.tracked if sim.tracked_at[i] >= start]
    at = sim.transport.delivered_at
    ok = [i for i in after if at.get(i, float("inf")) - sim.tracked_at[i] <= LIVENESS_BOUND]
    return len(after), len(ok)


@pytest.mark.parametrize("full_after", [0, 3])
def test_a_full_disk_during_a_spill_loses_nothing_a_healthy_server_could_take(
    full_after: int,
) -> None:
    """Bug 3: the disk fills up (at once, or after 3 rows) while an outage spills."""
    spool = FaultySpool(random.Random(0), full_after=full_after, bad_reads=0.0)
    sim = storage_run(spool)
    sim.check_final()
    stats = sim.tracker.stats
    assert "No space left" in stats.spool_error
    tracked, on_time = delivered_after_recovery(sim)
    assert tracked > 1_000 and on_time == tracked
    assert stats.dropped == stats.drops.get("max_buffer_bytes", 0) > 0  # by reason


def test_mutation_a_full_disk_that_kills_the_flusher_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """0.2's bug put back: the spill's failure escapes the flusher (no handler, no
    supervisor to restart it)."""

    def unhandled(self: Any, exc: Exception) -> None:
        raise exc

    monkeypatch.setattr(_flusher.Flusher, "_spill_failed", unhandled)
    monkeypatch.setattr(_flusher, "RESTART_DELAY", 3600.0)
    spool = FaultySpool(random.Random(0), full_after=0, bad_reads=0.0)
    sim = storage_run(spool)
    tracked, on_time = delivered_after_recovery(sim)
    assert on_time < tracked


def test_spilled_rows_that_cannot_be_read_stay_on_disk_and_the_rest_goes() -> None:
    """A spilled batch whose row cannot be read back stays spooled (re-sent by the next
    tracker); everything else is delivered."""
    spool = FaultySpool(random.Random(1), full_after=None, bad_reads=0.3)
    sim = storage_run(spool)
    sim.check_final()
    stats = sim.tracker.stats
    assert stats.spooled > 0 and stats.failed == 0
    tracked, on_time = delivered_after_recovery(sim)
    assert on_time == tracked


class UnreadableSpool(FaultySpool):
    def _load(self) -> Any:
        raise OSError(errno.EIO, "Input/output error")


def test_a_spool_that_cannot_be_read_at_start_stops_nothing() -> None:
    """Bug 2: the load at start fails; the tracker runs on without a spool."""
    sim = scripted(spool=UnreadableSpool(random.Random(0), None, 0.0))

    async def main() -> None:
        async with sim.tracker:
            await produce(sim, 10.0, 20, set())

    run_virtual(main)
    sim.check_final()
    assert "could not read the spool" in sim.tracker.stats.spool_error
    assert late(sim) == [] and sim.tracker.stats.delivered == 200


def test_mutation_a_spool_load_that_raises_stops_delivery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """0.2's bug put back: the failed load ends the flusher's run."""

    async def load_unguarded(self: Any) -> Any:
        return await self._ledger.spool.load()

    monkeypatch.setattr(_flusher.Flusher, "_load_spool", load_unguarded)
    sim = scripted(spool=UnreadableSpool(random.Random(0), None, 0.0))

    async def main() -> None:
        async with sim.tracker:
            await produce(sim, 10.0, 20, set())

    run_virtual(main)
    assert sim.tracker.stats.delivered < 200


def test_a_small_budget_lets_small_events_in_after_large_ones() -> None:
    """Bug 4: 1 KB events, then small ones, under a budget of 2 MB at defaults."""
    sim = scripted(max_buffer_bytes=2_000_000)

    async def main() -> None:
        async with sim.tracker:
            for _ in range(20):
                for _ in range(100):
                    i = sim.next_id
                    sim.next_id += 1
                    sim.tracker.track("usr", "view", context={"id": -1 - i, "pad": "x" * 1000})
                await asyncio.sleep(0.1)
            await sim.tracker.flush()
            await produce(sim, 10.0, 200, set())

    run_virtual(main)
    assert sim.tracker.stats.dropped == 0 and late(sim) == []


def test_mutation_the_old_budget_refuses_small_events_for_good(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def old_limit(self: Any) -> int:  # 0.2: room for every worker's body, never re-measured
        if not self.event_bytes:
            return self._max  # type: ignore[no-any-return]
        body = min(self._max_batch_bytes, self._batch_size * (self.event_bytes - EVENT_OVERHEAD))
        room = self._max_bytes - self._ledger.held_bytes - 4 * body
        return max(0, min(self._max, int(room / self.event_bytes)))

    monkeypatch.setattr(_buffer.Buffer, "limit", old_limit)
    monkeypatch.setattr(_buffer.Buffer, "_remeasure", lambda self: False)
    sim = scripted(max_buffer_bytes=2_000_000)

    async def main() -> None:
        async with sim.tracker:
            for _ in range(20):
                for _ in range(100):
                    sim.tracker.track("usr", "view", context={"id": -1, "pad": "x" * 1000})
                await asyncio.sleep(0.1)
            await sim.tracker.flush()
            await produce(sim, 10.0, 200, set())

    run_virtual(main)
    assert sim.tracker.stats.drops.get("max_buffer_bytes", 0) > 0


class BugOnProbe:
    """Wraps a transport: every request for the first batch probed during an outage
    raises RuntimeError (a bug on the probe path); the others go through."""

    def __init__(self, sim: Sim) -> None:
        self.sim, self.inner = sim, sim.transport
        self.bugged: str | None = None
        self.raised = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def post(self, body: bytes, key: str) -> Any:
        if self.bugged is None and self.sim.tracker._destination.outage:
            self.bugged = key
        if key == self.bugged:
            self.raised += 1
            raise RuntimeError("a bug on the probe path")
        return await self.inner.post(body, key)


def probe_bug_run() -> tuple[Sim, BugOnProbe]:
    sim = scripted(outage_grace=0.5, probe_max_delay=1.0, transport=BugOnProbe)
    bug = sim.tracker._transport
    assert isinstance(bug, BugOnProbe)

    async def main() -> None:
        async with sim.tracker:
            await _outage(sim, 5.0)
            await produce(sim, 20.0, 20, set())
            await asyncio.sleep(10.0)

    run_virtual(main)
    return sim, bug


def test_a_bug_while_probing_fails_that_batch_at_once_with_its_cause() -> None:
    """Bug 5: the probe's unexpected exception settles its batch at once (on_error, with
    the exception as the cause), counted and logged; it is never sent again, the outage
    ends, and the rest is delivered."""
    sim, bug = probe_bug_run()
    sim.check_final()
    stats = sim.tracker.stats
    assert bug.raised == 1
    ((error),) = list(sim.errors)
    assert isinstance(error.__cause__, RuntimeError)
    assert stats.internal_errors == 1 and stats.state == "healthy"
    assert stats.delivered + len(error.events) == stats.tracked


def test_mutation_a_bug_while_probing_that_parks_the_batch_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """0.2's prober put back: an exception parks the probed batch again, silently."""
    process = _sender.Sender._process

    async def old_process(self: Any, batch: Any, probe: bool = False) -> bool:
        if not probe:
            return await process(self, batch, probe)
        try:
            outcome = await self.attempts.attempt(batch, True)
        except Exception:
            self.backlog.park(batch)  # nothing settled, nothing logged
            return False
        if outcome is _attempts.PARK:
            self.backlog.park(batch)
            return False
        if isinstance(outcome, tuple):
            self.backlog.replace(batch, outcome)
            for half in outcome:
                self.backlog.park(half)
        return True

    monkeypatch.setattr(_sender.Sender, "_process", old_process)
    _, bug = probe_bug_run()
    assert bug.raised > 1


def test_the_widened_simulation_finds_a_spill_reported_without_its_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fault the widened model finds: a spilled batch that cannot be read back, failed
    with its (empty, spilled) events instead of staying spooled."""
    from lehnz_async._ledger import Fate, Ledger

    def report_it(self: Ledger, batch: Any, exc: BaseException) -> None:
        from lehnz_async import DeliveryError

        self.settle(batch, Fate.FAILED, DeliveryError("unreadable", batch.events))

    monkeypatch.setattr(Ledger, "unreadable_spill", report_it)
    found = first_failing_seed(range(2_000))
    assert found is not None, "no seed noticed spilled events reported without events"


def test_a_seed_with_every_new_fault_kind_passes() -> None:
    """Poison 5xx events, a disk that fills up, bad reads, transport bugs and an
    on_error that raises, all in one seed's schedule."""
    seen = set()
    for seed in range(2_000):
        sim = Sim(seed)
        kinds = {k for k, p in sim.transport.faults.items() if p}
        spool = sim.spool
        if (
            sim.p_poison5xx
            and "bug" in kinds
            and isinstance(spool, FaultySpool)
            and spool.full_after is not None
            and sim.errors.raise_every
        ):
            run_seed(seed)
            seen.add(seed)
            if len(seen) == 3:
                break
    assert len(seen) == 3
