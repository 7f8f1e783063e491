"""The inference thread: one thread, jobs in order, errors delivered, with and without spinning."""

from __future__ import annotations

import threading
import time

import pytest

from app.worker import InferenceWorker


@pytest.mark.parametrize("spin_s", [0.0, 0.05])
def test_jobs_run_in_order_on_one_thread_and_errors_reach_the_caller(spin_s: float) -> None:
    worker = InferenceWorker(threads=1, spin_s=spin_s)
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
        time.sleep(spin_s * 2)  # past the spin: the thread sleeps on its queue, and still wakes for a job
        assert worker.submit(job, 7).result(timeout=5) == 49
        assert seen == [(i, "inference") for i in (0, 1, 2, 3, 4, 7)]
        assert worker.busy_since is None
    finally:
        worker.shutdown(wait=True)
    assert not worker.alive


def test_a_spinning_worker_stops_at_shutdown() -> None:
    worker = InferenceWorker(threads=1, spin_s=10.0)  # it would poll for 10 s after the job
    worker.start()
    assert worker.submit(lambda: 1).result(timeout=5) == 1
    began = time.monotonic()
    worker.shutdown(wait=True)
    assert not worker.alive and time.monotonic() - began < 2.0
    with pytest.raises(RuntimeError, match="stopped"):
        worker.submit(lambda: 2)
