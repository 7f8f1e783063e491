"""`python -m app --model weights/shapesqa --host 127.0.0.1 --port 8000` (flags = FUSION_* variables).

This process loads the model and serves; with `--frontends N` it also starts N-1 front-end
processes on the same listening sockets (app.frontends, app.listeners). Shutdown on SIGTERM: see
app.server. A replica that cannot start (bad package, absent device, unusable API keys) exits 1
with one clear line; invalid settings exit 2; an address it cannot bind, 3 (uvicorn's code).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import CliApp
from uvicorn.config import STARTUP_FAILURE

from app.auth import ApiKeyError
from app.config import Settings
from app.engine import DeviceUnavailable, PrecisionUnsupported, check_precision, resolve_device
from app.frontends import FrontendPlan
from app.lifespan import remove_link_folder
from app.listeners import bind_listeners
from app.main import create_app
from app.server import build_server
from app.state import AppState
from model.manifest import PackageError, read_manifest

log = logging.getLogger("app")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        settings = CliApp.run(Settings, cli_args=args)
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
    server = build_server(app, settings)
    if settings.frontends == 1:
        server.run()
        return _exit_code(server.exit_code, app.state.fusion)
    # Bound here, before the lifespan, so that every front-end inherits the listening sockets and
    # the kernel hands each new connection to whichever process accepts first.
    try:
        listeners = bind_listeners(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", settings.host, settings.port, exc)
        return STARTUP_FAILURE
    state: AppState = app.state.fusion
    state.frontend_plan = FrontendPlan(settings.frontends - 1, tuple(args), tuple(s.fileno() for s in listeners))
    try:
        server.run(sockets=listeners)
    finally:
        # A second signal skips the lifespan's shutdown: no front-end and no link folder outlives us.
        if state.frontends is not None:
            state.frontends.kill()
        remove_link_folder(state)
    return _exit_code(server.exit_code, state)


def _exit_code(code: int, state: AppState) -> int:
    """The process's exit code. With the inference thread still inside a torch call (a hung pass,
    a load that never returned), the interpreter's exit would run C++ destructors under it, and
    libtorch aborts (SIGABRT, not the code): so the process ends here, its logs flushed."""
    if state.worker is not None and state.worker.alive and state.worker.busy_since is not None:
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
