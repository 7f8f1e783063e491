"""The server's own decisions at each tick: a startup timeout fails a replica still starting, but
never one already draining on a signal (whose stop goes on, to exit 0)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from app.main import create_app
from app.server import DrainingServer, build_server
from app.state import AppState, Phase
from tests.app.conftest import settings_for


def server_past_its_startup_timeout(package: Path) -> tuple[DrainingServer, AppState]:
    settings = settings_for(package, startup_timeout_s=0.001)
    app = create_app(settings)
    server = build_server(app, settings)
    time.sleep(0.01)  # past the timeout, never having started loading: still LOADING
    state: AppState = app.state.fusion
    return server, state


def test_a_replica_not_ready_within_the_startup_timeout_fails_and_exits_1(probe_package: Path) -> None:
    server, state = server_past_its_startup_timeout(probe_package)
    asyncio.run(server.on_tick(0))
    assert state.phase is Phase.FAILED
    assert state.failure == "not ready within --startup-timeout-s 0.001 s (still loading)"
    assert server.should_exit and server.exit_code == 1


def test_a_startup_timeout_during_a_drain_leaves_the_drain_alone(probe_package: Path) -> None:
    server, state = server_past_its_startup_timeout(probe_package)
    server.handle_exit(signal.SIGTERM, None)  # the drain begins: /readyz 503, served for the delay
    asyncio.run(server.on_tick(0))
    assert state.phase is Phase.LOADING and state.draining
    assert not server.should_exit and server.exit_code == 0
