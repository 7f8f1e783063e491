"""The inference thread: the one thread that ever calls into torch.

PyTorch's intra-op thread pool belongs to the thread that calls it (OpenMP teams are per calling
thread), so forward passes that hop between pool threads keep cold teams and ran 2-4x slower here
than the same calls on one thread. Everything torch does in the service (loading, warm-up, the
golden check, every batch) is submitted to this one thread, in order.

It is a `concurrent.futures.Executor`: the lifespan awaits its jobs with `loop.run_in_executor`, and
the batcher hears of each batch from a done callback, on this thread (app.batching).
`busy_since` lets a watchdog tell a hung forward pass from an idle thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

import torch

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_Job = tuple[Callable[[], Any], Future[Any]]


class InferenceWorker(Executor):
    def __init__(self, threads: int, name: str = "inference") -> None:
        self._threads = threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self.busy_since: float | None = None  # time.monotonic() when the running job started

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if self._closed:
            raise RuntimeError("the inference worker is stopped")
        future: Future[T] = Future()
        self._jobs.put((lambda: fn(*args, **kwargs), future))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        # Set here, not in the main thread: the OpenMP thread count is a per-thread setting.
        torch.set_num_threads(self._threads)
        while (job := self._jobs.get()) is not None:
            call, future = job
            if not future.set_running_or_notify_cancel():
                continue
            self.busy_since = time.monotonic()
            try:
                result = call()
            except BaseException as exc:  # delivered to the awaiting coroutine, never lost
                self.busy_since = None
                future.set_exception(exc)
            else:
                self.busy_since = None  # before the result: whoever awaits it sees an idle worker
                future.set_result(result)
