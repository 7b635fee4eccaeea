"""Where the tracker lives: threads, no loop at all, process exit, forks, users' tests."""

from __future__ import annotations

import asyncio
import threading

import anyio
import anyio.to_thread
import pytest

from lehnz_async import BlockingCallError, Tracker
from lehnz_async.testing import ReferenceServer, assert_tracked

from .conftest import assert_ledger, run_python, user_ids

# -- threads ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_track_from_many_threads_loses_nothing(server: ReferenceServer) -> None:
    threads, per_thread = 8, 5_000
    tracker = Tracker(server.api_key, endpoint=server.url, max_batch_size=100)
    started = threading.Barrier(threads)

    def worker(t: int) -> None:
        started.wait()  # all threads call track() at the same time
        for i in range(per_thread):
            tracker.track(f"t{t}_{i}", "view")

    async with tracker, anyio.create_task_group() as tg:
        for t in range(threads):
            tg.start_soon(anyio.to_thread.run_sync, worker, t)
    expected = sorted(f"t{t}_{i}" for t in range(threads) for i in range(per_thread))
    assert sorted(user_ids(server)) == expected
    assert tracker.stats.delivered == threads * per_thread
    assert_ledger(tracker.stats)


# -- no loop at all ---------------------------------------------------------------------


def test_a_program_with_no_event_loop_uses_the_same_tracker(
    threaded_server: ReferenceServer,
) -> None:
    with Tracker(threaded_server.api_key, endpoint=threaded_server.url) as tracker:
        for i in range(1_000):
            tracker.track(f"usr_{i}", "view")  # no loop runs in this thread
        tracker.flush_sync(timeout=10)
        assert len(threaded_server.events) == 1_000
        tracker.track("usr_last", "purchase")
    assert tracker.closed
    assert user_ids(threaded_server)[-1] == "usr_last"
    assert_ledger(tracker.stats)


def test_a_tracker_outlives_an_asyncio_run_that_never_closed_it(
    threaded_server: ReferenceServer,
) -> None:
    tracker = Tracker(threaded_server.api_key, endpoint=threaded_server.url, flush_interval=60)

    async def request_handler() -> None:
        tracker.track("usr_1", "view")  # starts the tracker on this run's loop

    asyncio.run(request_handler())  # tears the loop down, tracker not closed
    assert tracker.stats.queued == 1 and not tracker.closed
    asyncio.run(tracker.aclose())  # a later loop sends what the first one left
    assert user_ids(threaded_server) == ["usr_1"]


@pytest.mark.anyio
async def test_blocking_close_on_the_trackers_own_loop_is_refused(
    server: ReferenceServer,
) -> None:
    async with Tracker(server.api_key, endpoint=server.url) as tracker:
        tracker.track("usr_1", "view")
        with pytest.raises(BlockingCallError, match="await"):
            tracker.close()
    assert user_ids(server) == ["usr_1"]


# -- process exit and forks (real subprocesses) -----------------------------------------


@pytest.mark.anyio
async def test_a_script_that_never_closes_still_sends_at_exit(server: ReferenceServer) -> None:
    code, out = await run_python(
        """
        import sys
        from lehnz_async import Tracker
        tracker = Tracker(sys.argv[1], endpoint=sys.argv[2], flush_interval=60)
        for i in range(2_500):
            tracker.track(f"usr_{i}", "view")
        print("exiting with", tracker.stats.queued + tracker.stats.in_flight, "unsent")
        """,
        server.api_key,
        server.url,
    )
    assert code == 0, out
    assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(2_500))


@pytest.mark.anyio
async def test_events_left_by_a_torn_down_loop_are_sent_at_exit(server: ReferenceServer) -> None:
    code, out = await run_python(
        """
        import asyncio, sys
        from lehnz_async import Tracker
        tracker = Tracker(sys.argv[1], endpoint=sys.argv[2], flush_interval=60)

        async def main():
            for i in range(1_200):  # two full batches go out, the rest waits
                tracker.track(f"usr_{i}", "view")
            await asyncio.sleep(0)

        asyncio.run(main())  # no aclose(): the loop is torn down with events queued
        """,
        server.api_key,
        server.url,
    )
    assert code == 0, out
    assert sorted(user_ids(server)) == sorted(f"usr_{i}" for i in range(1_200))


@pytest.mark.anyio
async def test_after_fork_each_process_sends_its_own_events_once(
    server: ReferenceServer,
) -> None:
    code, out = await run_python(
        """
        import multiprocessing, os, sys, warnings
        from lehnz_async import Tracker
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: known
        tracker = Tracker(sys.argv[1], endpoint=sys.argv[2], flush_interval=60)
        for i in range(300):
            tracker.track(f"parent_{i}", "view")  # queued in the parent at fork time

        pid = os.fork()
        if pid == 0:  # a plain fork child that exits without closing
            tracker.track("fork_child", "view")
            sys.exit(0)
        os.waitpid(pid, 0)

        def mp_child():
            tracker.track("mp_child", "view")  # multiprocessing leaves through os._exit

        proc = multiprocessing.get_context("fork").Process(target=mp_child)
        proc.start()
        proc.join()
        tracker.close()
        print("parent stats", tracker.stats)
        """,
        server.api_key,
        server.url,
    )
    assert code == 0, out
    expected = [f"parent_{i}" for i in range(300)] + ["fork_child", "mp_child"]
    assert sorted(user_ids(server)) == sorted(expected), out
    assert "tracked=300," in out  # the parent's ledger knows nothing of its children


# -- users' own tests -------------------------------------------------------------------


@pytest.mark.anyio
async def test_capture_mode_records_instead_of_sending() -> None:
    async with Tracker(capture=True, max_batch_size=2) as tracker:
        tracker.track("usr_1", "view", item_id="p1")
        tracker.track("usr_1", "purchase", item_id="p1", context={"price": 9.5, "qty": 1})
        tracker.identify("usr_1", previous_user_id="anon_1")
        await tracker.flush()
        assert_tracked(tracker, event_name="purchase", context={"price": 9.5}, count=1)
        assert_tracked(tracker, event_family="system", previous_user_id="anon_1")
        with pytest.raises(AssertionError, match="expected 1 event"):
            assert_tracked(tracker, event_name="refund", count=1)
    assert [e.event_name for e in tracker.captured] == ["view", "purchase", "identify"]
    assert tracker.stats.batches == 2


def test_the_pytest_plugin_gives_a_server_a_tracker_and_a_capture(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest
        from lehnz_async.testing import assert_tracked

        pytestmark = pytest.mark.anyio

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        async def test_purchase_reaches_the_server(lehnz_tracker, lehnz_server):
            lehnz_tracker.track("usr_1", "purchase", item_id="p1", context={"price": 3})
            await lehnz_tracker.flush()
            assert_tracked(lehnz_server.events, event_name="purchase", count=1)

        async def test_capture(lehnz_capture):
            lehnz_capture.track("usr_1", "view", item_id="p1")
            await lehnz_capture.flush()
            assert_tracked(lehnz_capture, item_id="p1", count=1)
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "anyio", "-p", "no:looptime_plugin"
    )  # looptime's needs pytest-asyncio
    result.assert_outcomes(passed=2)


def test_a_loop_closed_without_teardown_does_not_break_track(
    threaded_server: ReferenceServer,
) -> None:
    tracker = Tracker(threaded_server.api_key, endpoint=threaded_server.url, flush_interval=60)

    async def first_use() -> None:
        tracker.track("usr_0", "view")  # starts the tracker on this loop

    loop = asyncio.new_event_loop()
    loop.run_until_complete(first_use())
    loop.close()  # closed, its tasks never cancelled: the tracker cannot know
    for i in range(1, 1_200):  # crosses a full batch: the wake-up finds the loop closed
        tracker.track(f"usr_{i}", "view")
    tracker.close()
    assert sorted(user_ids(threaded_server)) == sorted(f"usr_{i}" for i in range(1_200))
    assert_ledger(tracker.stats)
