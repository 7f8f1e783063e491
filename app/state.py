"""AppState: what one app instance holds, and the readiness and liveness it reports.

loading -> warming_up -> self_check -> ready        (any failure: failed, and the process exits)
ready + SIGTERM -> draining: /readyz 503, requests still served until the listener closes
ready + a hung forward pass -> dead (/healthz 503) until it ends; + a failing model -> not ready
(see app.health)

A front-end process (`--frontends N`) holds no model: its liveness and readiness are the device
process's, as last pushed over its link, and it is dead when the link is lost.
"""

from __future__ import annotations

import asyncio
import enum
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from app.body_memory import BodyMemory
from app.config import Settings
from app.decoding import Decoder
from app.errors import NotReady, ServiceError
from app.items import ByteArray, Kind, Row, TokenArray
from app.metrics import Metrics
from model.manifest import Manifest

if TYPE_CHECKING:  # the model's side imports torch, which a front-end process never loads
    from app.engine import Engine
    from app.frontends import FrontendPlan, FrontendSupervisor
    from app.handoff_client import DeviceLink
    from app.handoff_server import HandoffServer
    from app.health import HealthMonitor
    from app.worker import InferenceWorker

TicketT = TypeVar("TicketT")


class Phase(enum.StrEnum):
    LOADING = "loading"
    WARMING_UP = "warming_up"
    SELF_CHECK = "self_check"
    READY = "ready"
    FAILED = "failed"

    @property
    def settled(self) -> bool:
        """Startup is over, one way or the other."""
        return self in (Phase.READY, Phase.FAILED)


class Batcher(Protocol[TicketT]):
    """What the routes need of a batcher: the device's MicroBatcher, or a front-end's RemoteBatcher."""

    admitted: int  # tickets held

    @property
    def idle(self) -> bool: ...

    @property
    def broken(self) -> str | None: ...

    def refusal(self, left_s: float, allowance_s: float) -> ServiceError | None: ...

    def admit(self, left_s: float, allowance_s: float) -> TicketT: ...

    async def run(
        self,
        ticket: TicketT,
        kind: Kind,
        image: ByteArray | None,
        tokens: TokenArray | None,
        deadline: float,
        gone: asyncio.Future[None] | None = None,
    ) -> Row: ...

    async def stop(self, timeout_s: float) -> None: ...


class Serving(NamedTuple):
    """What a request needs once the model is ready."""

    settings: Settings
    metrics: Metrics
    manifest: Manifest
    decoder: Decoder
    batcher: Batcher[Any]
    decode_pool: ThreadPoolExecutor
    inline_under_load: bool  # cheap requests decode on the event loop whatever else is in the server
    bodies: BodyMemory


@dataclass(eq=False)
class AppState:
    settings: Settings
    metrics: Metrics
    phase: Phase = Phase.LOADING
    failure: str | None = None
    draining: bool = False
    # time.monotonic() by which accepted work must be done: set when the listener closes, so the
    # server's connection wait and the batcher's finish share one grace period rather than two.
    shutdown_deadline: float | None = None
    worker: InferenceWorker | None = None
    engine: Engine | None = None
    manifest: Manifest | None = None
    decoder: Decoder | None = None
    batcher: Batcher[Any] | None = None
    decode_pool: ThreadPoolExecutor | None = None
    inline_under_load: bool = False  # Settings.decodes_inline_under_load, resolved for this process
    monitor: HealthMonitor | None = None
    # --frontends N, in the device process: what to start, the started front-ends, their link.
    frontend_plan: FrontendPlan | None = None
    frontends: FrontendSupervisor | None = None
    handoff: HandoffServer | None = None
    # In a front-end process: the link to the device process (None in the device process).
    link: DeviceLink | None = None
    startup_task: asyncio.Task[None] | None = None
    startup_seconds: dict[str, float] = field(default_factory=dict)
    bodies: BodyMemory = field(init=False)  # the request bodies this process holds (--body-memory-mb)

    def __post_init__(self) -> None:
        self.bodies = BodyMemory(self.settings.body_memory_bytes(), self.metrics, self.settings.retry_after_s)
        # Read at each scrape, from what /healthz and /readyz would answer then: never out of step.
        self.metrics.alive.set_function(lambda: float(self.liveness() is None))
        self.metrics.ready.set_function(lambda: float(self.readiness() is None))

    @property
    def model_version(self) -> str | None:
        return self.manifest.version if self.manifest is not None else None

    @property
    def worker_alive(self) -> bool:
        return self.worker is not None and self.worker.alive

    def liveness(self) -> str | None:
        """None when alive; else why the orchestrator should restart this replica."""
        if self.link is not None and (reason := self.link.liveness()) is not None:
            return reason  # a front-end: the device process's, or dead without its link
        if self.phase is Phase.FAILED:
            return "startup failed"
        if self.worker is not None and not self.worker.alive:
            return "the inference worker has stopped"
        if self.batcher is not None and (reason := self.batcher.broken) is not None:
            return reason
        return self.monitor.liveness() if self.monitor is not None else None

    def readiness(self) -> str | None:
        """None when ready for traffic; else the reason (what /readyz says)."""
        if self.draining:
            return "draining"
        if self.link is not None and (reason := self.link.readiness()) is not None:
            return reason
        if self.phase is not Phase.READY:
            return f"startup failed: {self.failure}" if self.phase is Phase.FAILED else self.phase.value
        return self.liveness() or (self.monitor.readiness() if self.monitor is not None else None)

    def serving(self) -> Serving:
        """The ready parts, or 503. Draining does not refuse: requests are served until the listener closes."""
        if (
            self.phase is not Phase.READY
            or self.manifest is None
            or self.decoder is None
            or self.batcher is None
            or self.decode_pool is None
            or self.liveness() is not None
        ):
            reason = self.liveness() or "the model is still loading"
            raise NotReady(f"not ready: {reason}", retry_after_s=self.settings.retry_after_s)
        return Serving(
            self.settings,
            self.metrics,
            self.manifest,
            self.decoder,
            self.batcher,
            self.decode_pool,
            self.inline_under_load,
            self.bodies,
        )

    def begin_drain(self) -> None:
        self.draining = True

    def fail(self, message: str) -> None:
        self.phase = Phase.FAILED
        self.failure = message
