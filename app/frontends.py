"""In the device process: the front-end processes of `--frontends N`, started, watched, restarted, drained.

One Python process answers HTTP at about 1,000 requests/s at most, whatever the cores: the
framework, the multipart parser and the answers hold the GIL. A GPU runs this kind of model
many times faster than that. So with `--frontends N` the replica is N processes on the same
listening sockets (app.listeners): the device process (the model, the batcher, the inference thread, and HTTP
like any front-end) and N-1 front-end processes that parse, decode and answer, and hand their
decoded items to the device process (app.handoff). The device batches across all of them.

A front-end that exits unexpectedly is started again (after 1 s, doubling up to 30 s while it
keeps failing within 10 s of its start); its restarts are counted. On SIGTERM the device process
passes the signal on: every process drains the same way at the same time (/readyz 503, serve
for the drain delay, close, finish), and the device process keeps the batcher running until the
last front-end has finished.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from app.metrics import Metrics

log = logging.getLogger(__name__)

LINK_ENV: Final = "FUSIONSERVE_LINK"  # not FUSION_: the front-end's wiring, not a setting
LISTEN_FDS_ENV: Final = "FUSIONSERVE_LISTEN_FDS"
INDEX_ENV: Final = "FUSIONSERVE_FRONTEND"

WATCH_S: Final = 0.2
FIRST_BACKOFF_S: Final = 1.0
MAX_BACKOFF_S: Final = 30.0
STABLE_S: Final = 10.0  # a front-end that ran this long before exiting restarts after the first backoff
# Each front-end's grace period starts up to one server tick (0.1 s) after this process's: wait
# that much longer before killing one, or its last answers would be cut.
KILL_MARGIN_S: Final = 1.0


@dataclass(frozen=True)
class FrontendPlan:
    """What `python -m app` decided before serving: how many front-ends, and what they inherit."""

    count: int  # front-end processes besides the device process
    argv: tuple[str, ...]  # the command line's settings, passed on unchanged
    listen_fds: tuple[int, ...]  # the replica's listening sockets (app.listeners)


@dataclass(eq=False)
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_failures: int = 0  # exits within STABLE_S of the start, in a row
    restart_at: float | None = None


class FrontendSupervisor:
    def __init__(self, plan: FrontendPlan, link_path: Path, metrics: Metrics) -> None:
        self._plan = plan
        self._link_path = link_path
        self._metrics = metrics
        self._slots = [_Slot(index) for index in range(1, plan.count + 1)]
        self._stopping = False
        self._terms = 0  # SIGTERMs passed on to the front-ends
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        for slot in self._slots:
            self._spawn(slot)
        self._task = asyncio.create_task(self._watch_forever(), name="frontends")

    @property
    def pids(self) -> list[int]:
        return [slot.process.pid for slot in self._slots if slot.process is not None and slot.process.poll() is None]

    def begin_drain(self) -> None:
        """Pass SIGTERM on: each front-end drains as this process does. Nothing restarts from now on."""
        self._terms_up_to(1)

    def hurry(self) -> None:
        """A second SIGTERM for each front-end, as this process got one: the rest of the drain delay
        is skipped, accepted requests still finish."""
        self._terms_up_to(2)

    def _terms_up_to(self, count: int) -> None:
        self._stopping = True
        while self._terms < count:
            self._terms += 1
            self._signal(signal.SIGTERM)

    async def stop(self, deadline: float) -> None:
        """Drain every front-end (if not yet), wait for them until their grace period is over (this
        process's `deadline`, monotonic, plus KILL_MARGIN_S), then kill the rest."""
        self.begin_drain()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self.pids and time.monotonic() < deadline + KILL_MARGIN_S:
            await asyncio.sleep(0.02)
        if self.pids:
            log.error("%d front-end(s) did not finish within the grace period; killing them", len(self.pids))
        self.kill()

    def kill(self) -> None:
        """At once (a second signal, or the end of the grace period): no front-end outlives this process."""
        self._stopping = True
        self._signal(signal.SIGKILL)
        for slot in self._slots:
            if slot.process is not None:
                slot.process.wait()

    def _signal(self, signum: int) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signum)

    def _spawn(self, slot: _Slot) -> None:
        env = {
            **os.environ,
            LINK_ENV: str(self._link_path),
            LISTEN_FDS_ENV: ",".join(str(fd) for fd in self._plan.listen_fds),
            INDEX_ENV: str(slot.index),
        }
        slot.started = time.monotonic()
        try:
            slot.process = subprocess.Popen(
                [sys.executable, "-m", "app.frontend", *self._plan.argv],
                env=env,
                pass_fds=self._plan.listen_fds,
                # Its own session: a terminal's Ctrl+C reaches the device process only, which passes
                # it on once (a second signal would make a front-end stop without draining).
                start_new_session=True,
            )
        except OSError as exc:  # out of processes, memory or descriptors: try again later, as for a crash
            slot.quick_failures += 1
            delay_s = self._delay_s(slot)
            slot.restart_at = slot.started + delay_s
            log.error("front-end %d could not start (%s); trying again in %.0f s", slot.index, exc, delay_s)
            return
        slot.restart_at = None
        log.info("front-end %d started (pid %d)", slot.index, slot.process.pid)

    async def _watch_forever(self) -> None:
        while True:
            now = time.monotonic()
            for slot in self._slots:
                if self._stopping:
                    continue
                code = slot.process.poll() if slot.process is not None else None
                if code is not None and slot.restart_at is None:
                    ran_s = now - slot.started
                    slot.quick_failures = slot.quick_failures + 1 if ran_s < STABLE_S else 1
                    delay_s = self._delay_s(slot)
                    slot.restart_at = now + delay_s
                    log.warning(
                        "front-end %d (pid %d) exited with %d after %.1f s; restarting in %.0f s",
                        slot.index,
                        slot.process.pid if slot.process is not None else 0,
                        code,
                        ran_s,
                        delay_s,
                    )
                if slot.restart_at is not None and now >= slot.restart_at:
                    self._metrics.frontend_restarts.inc()
                    self._spawn(slot)
            await asyncio.sleep(WATCH_S)

    @staticmethod
    def _delay_s(slot: _Slot) -> float:
        return min(FIRST_BACKOFF_S * 2.0 ** max(0, slot.quick_failures - 1), MAX_BACKOFF_S)
