"""`python -m app --model weights/shapesqa --host 127.0.0.1 --port 8000` (flags = FUSION_* variables).

Shutdown on SIGTERM (or Ctrl+C), in order:
1. /readyz answers 503 at once, so the load balancer stops sending;
2. requests keep being served normally for drain_delay_s (answers carry Connection: close, so
   keep-alive clients move on);
3. the listener closes; accepted requests (queued and running) finish, up to graceful_timeout_s;
4. the process exits 0. A second signal stops at once.
A replica that cannot start (bad package, absent device, unusable API keys) exits 1 with one
clear line; invalid settings exit 2.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp

from app.auth import ApiKeyError
from app.config import Settings
from app.engine import DeviceUnavailable, PrecisionUnsupported, check_precision, resolve_device
from app.main import create_app
from app.protocol import guarded_protocol
from app.state import AppState, Phase
from model.package import PackageError, read_manifest

log = logging.getLogger("app")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains before it stops, and which exits when startup fails."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self._drain_until: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_until is None and not self.should_exit and sig in (signal.SIGTERM, signal.SIGINT):
            # In a signal handler: set flags only; on_tick logs and acts.
            self.state.begin_drain()
            self._drain_until = time.monotonic() + self.state.settings.drain_delay_s
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and not self.should_exit:
            if counter % 10 == 0:
                log.info("draining: /readyz is 503; serving until the drain delay ends")
            if time.monotonic() >= self._drain_until:
                log.info("drain delay over: closing the listener and finishing accepted requests")
                self.state.shutdown_deadline = time.monotonic() + self.state.settings.graceful_timeout_s
                self.should_exit = True
        if self.state.phase is Phase.FAILED and not self.should_exit:
            self.exit_code = 1
            self.should_exit = True
        return await super().on_tick(counter)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = CliApp.run(Settings, cli_args=list(sys.argv[1:] if argv is None else argv))
    except ValidationError as exc:
        sys.stderr.write(f"fusionserve: invalid settings:\n{exc}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        check_precision(resolve_device(settings.device), settings.precision)
        read_manifest(settings.model)  # the cheap checks, before binding a port; the rest in the lifespan
        app = create_app(settings)
    except (DeviceUnavailable, PrecisionUnsupported, PackageError, ApiKeyError) as exc:
        log.error("cannot serve: %s", exc)
        return 1
    config = uvicorn.Config(
        app,
        http=guarded_protocol(settings.max_header_bytes, settings.header_timeout_s, settings.body_timeout_s),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=math.ceil(settings.graceful_timeout_s),
        server_header=False,
        log_config=None,  # keep the logging configured above
    )
    server = DrainingServer(config, app.state.fusion)
    server.run()
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())
