"""The uvicorn server of every process of a replica: drains on its first SIGTERM, exits when startup fails.

Shutdown on SIGTERM (or Ctrl+C), in order:
1. /readyz answers 503 at once, so the load balancer stops sending;
2. requests keep being served normally for drain_delay_s (answers carry Connection: close, so
   keep-alive clients move on);
3. the listener closes; accepted requests (queued and running) finish, up to graceful_timeout_s;
4. the process exits 0. A second signal stops at once.

With `exit_when_dead_s`, a replica whose /healthz has answered 503 that long (a hung forward pass,
a device lost, a dead inference thread) stops the same way by itself and exits 1: under a
supervisor that restarts a process when it exits but never probes it (docker compose), it would
otherwise stay up, out of the load balancer's pool, until someone restarted it by hand. With
`startup_timeout_s`, one not ready that long after it started (a load, warm-up or self-check that
hangs) fails its startup and exits 1 for the same reason.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.config import Settings
from app.protocol import guarded_protocol
from app.state import AppState, Phase

log = logging.getLogger("app")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains before it stops, and which exits when startup fails."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self._drain_until: float | None = None
        self._dead_since: float | None = None
        self._started = time.monotonic()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_until is None and not self.should_exit and sig in (signal.SIGTERM, signal.SIGINT):
            self._begin_drain()  # in a signal handler: flags only; on_tick logs and acts
            return
        if self.state.frontends is not None:  # front-ends hear each further signal as this process does
            if self.should_exit:
                self.state.frontends.kill()  # stop at once
            else:
                self.state.frontends.hurry()  # close now, finish what was accepted
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        """/readyz 503 from now; the listener closes once the drain delay is over (on_tick)."""
        self.state.begin_drain()
        self._drain_until = time.monotonic() + self.state.settings.drain_delay_s

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and not self.should_exit:
            if counter % 10 == 0:
                log.info("draining: /readyz is 503; serving until the drain delay ends")
            if self.state.frontends is not None:
                self.state.frontends.begin_drain()  # once; each front-end drains as this process does
            if time.monotonic() >= self._drain_until:
                log.info("drain delay over: closing the listener and finishing accepted requests")
                self.state.shutdown_deadline = time.monotonic() + self.state.settings.graceful_timeout_s
                self.should_exit = True
        self._fail_if_not_ready_in_time()
        if self.state.phase is Phase.FAILED and not self.should_exit:
            self.exit_code = 1
            self.should_exit = True
        self._exit_if_dead_too_long()
        return await super().on_tick(counter)

    @property
    def _may_stop_itself(self) -> bool:
        """Whether this process may decide to stop on its own now: it is the device process (a
        front-end's readiness and liveness are the device's, and the device stops its front-ends
        as it stops), and no stop has begun (a signal's drain, which exits 0, goes on as it is)."""
        return self.state.link is None and self._drain_until is None and not self.should_exit

    def _fail_if_not_ready_in_time(self) -> None:
        limit = self.state.settings.startup_timeout_s
        if limit <= 0 or not self._may_stop_itself or self.state.phase.settled:
            return
        if time.monotonic() - self._started >= limit:
            phase = self.state.phase.value
            log.critical("not ready %g s after starting (still %s): failing, to be restarted", limit, phase)
            if self.state.startup_task is not None:
                self.state.startup_task.cancel()  # or it would go on to the next phase, or to ready
            self.state.fail(f"not ready within --startup-timeout-s {limit:g} s (still {phase})")

    def _exit_if_dead_too_long(self) -> None:
        limit = self.state.settings.exit_when_dead_s
        if limit <= 0 or not self._may_stop_itself:
            return
        reason = self.state.liveness()
        if reason is None:
            self._dead_since = None
            return
        now = time.monotonic()
        if self._dead_since is None:
            self._dead_since = now
        elif now - self._dead_since >= limit:
            log.critical("/healthz has answered 503 for %g s (%s): stopping, to be restarted", limit, reason)
            self.exit_code = 1
            self._begin_drain()


def build_server(app: FastAPI, settings: Settings) -> DrainingServer:
    # A torch call gives up the GIL, and the inference thread takes it back after each forward
    # pass; while the event loop or a decoding thread runs Python, that wait lasts up to the switch
    # interval. Beside a thread running Python, a batch of 16 took 1.53x its time alone at Python's
    # 5 ms, 1.18x at 0.2 ms; served, 1.2x the throughput at concurrency 32 and 64 (README).
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    config = uvicorn.Config(
        app,
        http=guarded_protocol(settings.max_header_bytes, settings.header_timeout_s, settings.body_timeout_s),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=math.ceil(settings.graceful_timeout_s),
        server_header=False,
        log_config=None,  # keep the logging configured by the entry point
    )
    return DrainingServer(config, app.state.fusion)
