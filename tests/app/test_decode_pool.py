"""The decode pool's threads run nicer than the thread that started them, and only they do."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from app.config import Settings
from app.decode_pool import MAX_NICE, decode_nice_in_force, lower_thread_priority, start_decode_pool

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux only")


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def nice_in_new_thread(increment: int) -> tuple[int, int]:
    """(before, after) lowering its priority, in a fresh thread: the test's own thread keeps its own."""
    seen: list[int] = []

    def body() -> None:
        seen.append(own_nice())
        lower_thread_priority(increment)
        seen.append(own_nice())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return seen[0], seen[1]


def nice_after(barrier: threading.Barrier) -> int:
    barrier.wait(timeout=10)
    return own_nice()


@linux_only
def test_a_thread_lowers_its_own_priority_by_the_increment_and_no_other_thread_changes() -> None:
    mine = own_nice()
    before, after = nice_in_new_thread(3)
    assert before == mine
    assert after == min(MAX_NICE, mine + 3)
    assert own_nice() == mine


@linux_only
def test_the_increment_stops_at_the_lowest_priority() -> None:
    assert nice_in_new_thread(MAX_NICE + 1)[1] == MAX_NICE


@linux_only
def test_every_pool_thread_runs_at_the_setting_and_zero_leaves_them_alone() -> None:
    mine = own_nice()
    for setting, expected in ((7, min(MAX_NICE, mine + 7)), (0, mine)):
        settings = Settings(decode_workers=2, decode_nice=setting)
        assert decode_nice_in_force(settings) == setting
        pool = start_decode_pool(settings)
        try:
            barrier = threading.Barrier(2)  # both tasks at once: two threads, not one reused
            futures = [pool.submit(nice_after, barrier) for _ in range(2)]
            assert [future.result(timeout=10) for future in futures] == [expected, expected]
        finally:
            pool.shutdown()
    assert own_nice() == mine


@linux_only
def test_a_refused_priority_change_leaves_the_thread_serving(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A sandbox that forbids setpriority must not break the pool: an initializer that raised
    would make every decode fail."""

    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    pool = start_decode_pool(Settings(decode_workers=1, decode_nice=5))
    try:
        assert pool.submit(own_nice).result(timeout=10) == own_nice()
    finally:
        pool.shutdown()
    assert "a decode thread keeps its priority: setpriority failed" in caplog.text
