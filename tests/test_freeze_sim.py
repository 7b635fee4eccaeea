"""Freezing (issue 19) on virtual time, with the deterministic simulation's model server
and checks: every guarantee holds while waiting contexts are frozen, and two mutations of
the freezer are caught. (Over real HTTP: tests/test_freeze.py.)"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("looptime", reason="virtual time needs looptime 0.9 (Python 3.11+)")

from .sim import Sim, run_steadily, run_virtual, scripted


def freezing_run(monkeypatch: pytest.MonkeyPatch) -> tuple[Sim, list[int]]:
    """Defaults but a 5 s flush interval; 200 events/s, 20 at a time, so that 128 wait
    between two ticks; the sim's mix of poison, 5xx-poison, unencodable and identify
    events; a 3 s outage at 10 s; a mark every 5 s. Returns the sim and how many events
    each freeze encoded."""
    from lehnz_async import _buffer

    frozen: list[int] = []
    real = _buffer.Buffer.freeze_waiting

    def spy(self: _buffer.Buffer) -> None:
        frozen.append(len(self.events))
        real(self)

    monkeypatch.setattr(_buffer.Buffer, "freeze_waiting", spy)
    sim = scripted(flush_interval=5.0)
    sim.p_poison5xx = 0.002

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with sim.tracker:
            for step in range(300):
                sim.track_some(20)
                if step == 100:
                    sim.transport.down_kind = "reset"
                    sim.transport.down_until = loop.time() + 3.0
                if step % 50 == 0:
                    sim.take_mark()
                await asyncio.sleep(0.1)
            await asyncio.sleep(120.0)  # poison batches run out of retries

    run_virtual(main)
    return sim, frozen


def test_freezing_keeps_every_guarantee_of_the_simulation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim, frozen = freezing_run(monkeypatch)
    assert sum(frozen) > 2_000, frozen  # most events waited long enough to be frozen
    sim.check_final()  # each event delivered once, or reported (as a dict), or spooled
    sim.check_receipts()
    assert sim.poison and sim.errors, "the run holds failures to report"


def test_mutation_frozen_contexts_reach_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: without thawing, on_error sees the frozen JSON."""
    from lehnz_async import _reports

    monkeypatch.setattr(_reports, "thaw", lambda events: None)
    sim, _ = freezing_run(monkeypatch)
    with pytest.raises(AssertionError, match="not a dict"):
        sim.check_final()


def test_mutation_a_freeze_that_loses_an_event_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a freeze that moves all but the last waiting event."""
    from lehnz_async import _buffer

    real = _buffer.Buffer.freeze_waiting

    def lossy(self: _buffer.Buffer) -> None:
        if len(self.events) > 1:
            self.events.pop()
        real(self)

    monkeypatch.setattr(_buffer.Buffer, "freeze_waiting", lossy)
    sim = scripted(flush_interval=5.0)
    run_steadily(sim, 100, 20, 0.1)
    with pytest.raises(AssertionError):
        sim.check_final()
