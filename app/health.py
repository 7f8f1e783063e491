"""HealthMonitor: liveness and readiness from what the inference thread actually does.

Liveness (/healthz) turns red when a forward pass hangs: a watchdog sees the inference thread busy
with one batch for longer than `forward_timeout_s`, fails that batch's requests (500
model_timeout) and everything queued behind it (503, to retry elsewhere), and reports the replica
dead so that the orchestrator restarts it (a Python thread cannot be stopped from outside). If the
pass does finish after all, the replica is alive again.

Readiness (/readyz) turns red when the model itself seems broken: after `max_failed_batches`
batches in a row in which no item got an answer, the package's golden check runs on the inference
thread. A poisoned input fails its own batches but not the golden check, so it costs one check
and no readiness; a broken model fails both, and /readyz answers 503 until the golden check passes
again: rerun every few seconds, and at once after a batch that succeeds (a request the load
balancer still sends). A batch that succeeds is not proof enough by itself: a model broken for one
method (say /predict's forward) still answers another (/embed's image encoder), and taking that
for recovery turned readiness green and red again at every such batch.

Liveness turns red for good, too, when the golden check fails with a device error (a CUDA error
other than running out of memory: an illegal memory access, a device-side assert). That leaves the
process's CUDA context unusable, and unlike a broken package, a restart mends it; left merely not
ready, the replica would hold its GPU and serve nothing until someone noticed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

from app.batching import MicroBatcher
from app.engine import is_device_lost
from app.errors import ModelFailure, NotReady
from app.metrics import Metrics
from app.worker import InferenceWorker

log = logging.getLogger(__name__)

RECHECK_S: Final = 5.0  # while failing, how often the golden check reruns


class HealthMonitor:
    def __init__(
        self,
        *,
        worker: InferenceWorker,
        metrics: Metrics,
        forward_timeout_s: float,
        max_failed_batches: int,
        golden_check: Callable[[], None],
        retry_after_s: int,
    ) -> None:
        self.worker = worker
        self.metrics = metrics
        self.forward_timeout_s = forward_timeout_s
        self.max_failed_batches = max_failed_batches
        self.golden_check = golden_check  # runs on the inference thread; raises when the model is broken
        self.retry_after_s = retry_after_s
        self.hung: str | None = None  # why liveness is red while a pass hangs
        self.lost: str | None = None  # why liveness is red for good: the device failed beyond repair
        self.failing: str | None = None  # why readiness is red
        self.failed_batches = 0
        self._checking = False
        self._last_check = -float("inf")
        self._task: asyncio.Task[None] | None = None
        self._check_task: asyncio.Task[None] | None = None  # held: the loop keeps only weak references

    def liveness(self) -> str | None:
        return self.hung or self.lost

    def readiness(self) -> str | None:
        return self.failing

    # -- batch outcomes (called by the batcher on the event loop) --------------------------------

    def batch_done(self, answered: bool) -> None:
        if answered:
            if self.failing is None:
                self._recovered("a batch succeeded")
            else:
                self._check_soon()  # recovered, or only this method works: the golden check says which
            return
        self.failed_batches += 1
        self.metrics.failed_batches.set(self.failed_batches)
        if self.failed_batches >= self.max_failed_batches and self.failing is None:
            self._check_soon()

    def _recovered(self, how: str) -> None:
        self.failed_batches = 0
        self.metrics.failed_batches.set(0)
        if self.failing is not None:
            log.warning("the model answers again (%s): ready", how)
            self.failing = None

    def _check_soon(self) -> None:
        if not self._checking:
            self._checking = True
            self._last_check = time.monotonic()
            self._check_task = asyncio.get_running_loop().create_task(self._golden_check(), name="golden-check")

    async def _golden_check(self) -> None:
        try:
            await asyncio.wrap_future(self.worker.submit(self.golden_check))
        except Exception as exc:
            if self.failing is None:
                log.error("the last %d batches failed, and so did the golden check: not ready", self.failed_batches)
                log.error("golden check: %s", exc)
            self.failing = f"the model is failing: the last {self.failed_batches} batches and the golden check failed"
            if is_device_lost(exc) and self.lost is None:
                # Unlike a broken package, a new process does mend this: liveness asks for one.
                log.critical("the device failed beyond repair in this process: /healthz is 503")
                self.lost = "the device failed (a CUDA error): only a new process can use it again"
        else:
            self._recovered("the golden check passed")
        finally:
            self._checking = False

    # -- the watchdog ----------------------------------------------------------------------------

    def start(self, batcher: MicroBatcher) -> None:
        self._task = asyncio.create_task(self._watch(batcher), name="watchdog")

    async def stop(self) -> None:
        tasks = [task for task in (self._task, self._check_task) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, batcher: MicroBatcher) -> None:
        tick = min(0.25, self.forward_timeout_s / 4)
        while True:
            await asyncio.sleep(tick)
            self.check(batcher, time.monotonic())

    def check(self, batcher: MicroBatcher, now: float) -> None:
        busy_since = self.worker.busy_since
        if busy_since is not None and now - busy_since > self.forward_timeout_s:
            if self.hung is None:
                self._trip(batcher)
        elif self.hung is not None:
            log.warning("the hung forward pass has finished: alive again")
            self.hung = None
            batcher.resume()
        if self.failing is not None and not self._checking and now - self._last_check >= RECHECK_S:
            self._check_soon()

    def _trip(self, batcher: MicroBatcher) -> None:
        limit = f"{self.forward_timeout_s:g} s"
        log.error("a forward pass has run for more than %s: failing its batch; /healthz is 503 until it ends", limit)
        self.hung = f"a forward pass has run for more than forward_timeout_s ({limit})"
        self.metrics.hung.inc()
        batcher.abandon(
            running=ModelFailure(f"the model did not finish within {limit}", code="model_timeout"),
            queued=NotReady("the model is not responding on this replica", retry_after_s=self.retry_after_s),
        )
