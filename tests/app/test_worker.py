"""The inference thread: one thread, jobs in order, errors delivered, a clean stop."""

from __future__ import annotations

import threading
import time

import pytest

from app.worker import InferenceWorker


def test_jobs_run_in_order_on_one_thread_and_errors_reach_the_caller() -> None:
    worker = InferenceWorker(threads=1)
    worker.start()
    seen: list[tuple[int, str]] = []

    def job(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * i

    def fail() -> None:
        raise ValueError("broken batch")

    try:
        futures = [worker.submit(job, i) for i in range(5)]
        assert [f.result(timeout=5) for f in futures] == [0, 1, 4, 9, 16]
        with pytest.raises(ValueError, match="broken batch"):
            worker.submit(fail).result(timeout=5)
        time.sleep(0.05)  # the thread sleeps on its queue, and still wakes for a job
        assert worker.submit(job, 7).result(timeout=5) == 49
        assert seen == [(i, "inference") for i in (0, 1, 2, 3, 4, 7)]
        assert worker.busy_since is None
    finally:
        worker.shutdown(wait=True)
    assert not worker.alive


def test_a_stopped_worker_refuses_new_jobs() -> None:
    worker = InferenceWorker(threads=1)
    worker.start()
    assert worker.submit(lambda: 1).result(timeout=5) == 1
    worker.shutdown(wait=True)
    assert not worker.alive
    with pytest.raises(RuntimeError, match="stopped"):
        worker.submit(lambda: 2)
