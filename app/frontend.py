"""A front-end process of `--frontends N`: started by the device process, never by hand.

It runs the same app as the device process (routes, limits, API keys, parsing, decoding, errors)
on the inherited listening sockets, with no model: its batcher hands decoded items to the device
process (app.handoff_client). It reads the package's manifest itself (labels, input size) and
starts accepting connections only once the device process has loaded that very archive (same
sha256): until then the device process alone answers, /readyz 503 while it loads.

Exit codes: 0 after a drain; 1 when the device process has gone or serves another archive before
this process serves, or goes while it serves; 3 (uvicorn's) when it goes in between; 2 for invalid
settings (the device process would have refused them first).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import CliApp

from app.config import Settings
from app.decode_pool import start_decode_pool
from app.decoding import Decoder
from app.frontends import INDEX_ENV, LINK_ENV, LISTEN_FDS_ENV
from app.handoff_client import DEVICE_GONE, DeviceLink, RemoteBatcher
from app.main import create_app
from app.schemas import InfoResponse
from app.server import build_server
from app.state import AppState, Phase
from model.manifest import Manifest, PackageError, read_manifest

log = logging.getLogger("app.frontend")

CONNECT_TIMEOUT_S: Final = 30.0


def answer_margin_s(settings: Settings) -> float:
    """How long past an item's deadline the device process may take to answer: by then its forward
    watchdog has failed a hung batch (500), so silence means the device process is not answering."""
    return settings.forward_timeout_s + 1.0


class FrontendError(Exception):
    """This front-end cannot serve (the device process has gone, or serves another archive)."""


@asynccontextmanager
async def frontend_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Linked before it yields: uvicorn listens only once this process can serve (main() waited for
    the device process to load), so a load balancer never meets a front-end that is starting."""
    state: AppState = app.state.fusion
    link = state.link
    assert link is not None
    state.decode_pool = start_decode_pool(state.settings)
    # Front-ends are for a GPU host: their pools decode in parallel on the cores the device leaves.
    state.inline_under_load = state.settings.decodes_inline_under_load(on_cuda=True)
    try:  # a link that fails to come up still closes, and the pool still shuts down
        manifest = await _link_up(link, state.settings)
        state.manifest = manifest
        state.decoder = Decoder.serving(state.settings, manifest, state.metrics)
        # The device may run a batch and hold the next one handed over early (--lookahead-ms): two batches.
        running = 2 * state.settings.max_batch_size
        state.batcher = RemoteBatcher(link, state.settings.max_queue, running, state.metrics)
        link.announce_serving()
        state.phase = Phase.READY
        log.info("serving %s %s through the device process", manifest.name, manifest.version)
        yield
    finally:
        await _stop(state, link)


async def _link_up(link: DeviceLink, settings: Settings) -> Manifest:
    """Connect, wait until the device process has loaded its model, and check that it is the
    archive of the package here (the manifest's labels and sizes are read from it)."""
    await link.connect(CONNECT_TIMEOUT_S)
    while not link.device.info and not link.lost:
        link.state_changed.clear()
        await link.state_changed.wait()
    if link.lost:
        raise FrontendError(DEVICE_GONE)
    manifest = read_manifest(settings.model)
    served = InfoResponse.model_validate_json(link.device.info).model
    if served.sha256 != manifest.archive_sha256:
        raise FrontendError(f"the device process serves {served.sha256[:12]}, the package here is another")
    return manifest


async def _wait_for_device(link_path: Path, settings: Settings) -> str | None:
    """Before uvicorn starts: None once the device process serves this package, else why not."""
    link = DeviceLink(link_path, lambda: b"", settings.retry_after_s, answer_margin_s(settings))
    try:
        await _link_up(link, settings)
    except (FrontendError, OSError, PackageError) as exc:
        return str(exc)
    finally:
        await link.close()
    return None


async def _stop(state: AppState, link: DeviceLink) -> None:
    end = state.shutdown_deadline or time.monotonic() + state.settings.graceful_timeout_s
    if state.batcher is not None:
        await state.batcher.stop(max(0.0, end - time.monotonic()))
    await link.close(final_snapshot=state.metrics.render())
    if state.decode_pool is not None:
        state.decode_pool.shutdown(wait=False, cancel_futures=True)


def main() -> int:
    link_path, index = Path(os.environ[LINK_ENV]), os.environ[INDEX_ENV]
    listen_fds = [int(fd) for fd in os.environ[LISTEN_FDS_ENV].split(",")]
    try:
        settings = CliApp.run(Settings, cli_args=sys.argv[1:])
    except ValidationError as exc:
        sys.stderr.write(f"fusionserve front-end {index}: invalid settings:\n{exc}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[front-end {index}]: %(message)s",
        force=True,
    )
    if (reason := asyncio.run(_wait_for_device(link_path, settings))) is not None:
        log.error("this front-end cannot serve: %s", reason)
        return 1
    app = create_app(settings, lifespan=frontend_lifespan)
    state: AppState = app.state.fusion
    link = DeviceLink(link_path, state.metrics.render, settings.retry_after_s, answer_margin_s(settings))
    link.on_lost = lambda: state.fail("the device process has gone")
    state.link = link
    server = build_server(app, settings)
    server.run(sockets=[socket.socket(fileno=fd) for fd in listen_fds])
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())
