"""Startup and shutdown: load and verify the package, warm up, self-check, serve; then drain.

Startup runs in the background once the lifespan begins, so the listener is up at once: /healthz
answers 200 (alive) and /readyz 503 with the phase, and an orchestrator can tell a slow start
from a dead one. Each phase runs on the inference thread and its duration is logged and exported
(`fusion_startup_seconds{phase}`). Any failure is fatal: the reason is logged in one line and
the process exits non-zero (see `app.__main__`); a replica that failed never reports ready.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch
from fastapi import FastAPI

from app.batching import MicroBatcher, StageBuffers, stages_per_kind
from app.decode_pool import start_decode_pool
from app.decoding import Decoder
from app.engine import Engine, WarmUp, resolve_device
from app.frontends import FrontendSupervisor
from app.handoff_server import HandoffServer
from app.health import HealthMonitor
from app.items import Kind
from app.routes.info import info_body
from app.state import AppState, Phase
from app.worker import InferenceWorker
from model.manifest import read_manifest

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def warmup_text_lengths(max_length: int) -> list[int]:
    """A short question, a long one, and the longest the model takes."""
    return sorted({min(length, max_length) for length in (8, 32, max_length // 2, max_length)} - {0})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.fusion
    try:
        start(state)
        if state.frontend_plan is not None:
            await start_frontends(state)
        yield
    finally:
        await stop(state)


def start(state: AppState) -> None:
    settings = state.settings
    device = resolve_device(settings.device)  # fails fast; the CLI checks it before binding, too
    state.worker = InferenceWorker(settings.intra_op_threads(on_cuda=device.type == "cuda"))
    state.worker.start()
    state.decode_pool = start_decode_pool(settings)
    state.inline_under_load = settings.decodes_inline_under_load(on_cuda=device.type == "cuda")
    state.startup_task = asyncio.create_task(_bring_up(state, device), name="startup")


async def start_frontends(state: AppState) -> None:
    """--frontends N: the link's socket (in a private folder), then the front-end processes."""
    assert state.frontend_plan is not None
    folder = Path(tempfile.mkdtemp(prefix="fusionserve-"))  # mode 0700: this user's processes only
    info = b""

    def device_info() -> bytes:
        nonlocal info  # fixed once ready (the call costs are measured before)
        if not info and state.phase is Phase.READY:
            info = info_body(state)
        return info

    state.handoff = HandoffServer(state, folder / "link.sock", device_info)
    await state.handoff.start()
    state.frontends = FrontendSupervisor(state.frontend_plan, folder / "link.sock", state.metrics)
    state.frontends.start()


def remove_link_folder(state: AppState) -> None:
    if state.handoff is not None:
        shutil.rmtree(state.handoff.path.parent, ignore_errors=True)


async def stop(state: AppState) -> None:
    """Finish what is queued and running, then stop the threads; all within one grace period."""
    # One grace period in all: it started when the listener closed, if the drain set a deadline.
    end = state.shutdown_deadline or time.monotonic() + state.settings.graceful_timeout_s
    if state.frontends is not None:
        # First: their accepted requests still need this process's batcher.
        await state.frontends.stop(end)
    if state.handoff is not None:
        await state.handoff.close()
        remove_link_folder(state)
    if state.startup_task is not None and not state.startup_task.done():
        state.startup_task.cancel()
        await asyncio.gather(state.startup_task, return_exceptions=True)
    if state.batcher is not None:
        # The watchdog still watches meanwhile: a pass that hangs during the drain is failed (and
        # its batch no longer waited for) rather than holding the process to the grace period's end.
        await state.batcher.stop(max(0.0, end - time.monotonic()))
    if state.monitor is not None:
        await state.monitor.stop()
    if state.decode_pool is not None:
        state.decode_pool.shutdown(wait=False, cancel_futures=True)
    if state.worker is not None:
        # Polled, not joined: a call still running on the worker (a hung forward pass) must not hold
        # the exit past the grace period (the thread is a daemon).
        state.worker.shutdown(wait=False)
        # An idle worker stops as soon as it takes the stop from its queue, even past the grace period.
        while state.worker.alive and (time.monotonic() < end or state.worker.busy_since is None):
            await asyncio.sleep(0.01)
        if state.worker.alive:
            log.error("the inference worker did not stop within the grace period; exiting without it")


async def _bring_up(state: AppState, device: torch.device) -> None:
    try:
        await _phases(state, device)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # PackageError, DeviceUnavailable, OutputContractError or anything else: fatal
        log.error("startup failed, this replica will not serve: %s", exc)
        log.debug("startup failure", exc_info=True)
        state.fail(str(exc))


async def _phases(state: AppState, device: torch.device) -> None:
    settings, metrics = state.settings, state.metrics
    begin = time.perf_counter()

    state.manifest = await _on_worker(state, read_manifest, settings.model)  # the version header, from now on
    load = _on_worker(state, Engine.load, settings.model, device, metrics, settings.precision, settings.optimize_graph)
    engine = await _timed(state, "load", load)
    state.engine, state.manifest = engine, engine.manifest
    manifest = engine.manifest
    log.info(
        "loaded %s %s from %s on %s at %s", manifest.name, manifest.version, settings.model, device, engine.precision
    )

    state.phase = Phase.WARMING_UP
    lengths = warmup_text_lengths(manifest.max_text_length)
    plan = engine.warm_up_plan(list(Kind), settings.max_batch_size, lengths)
    await _timed(state, "warmup", _warm_up(state, engine, plan))
    sizes = sorted({step.size for step in plan})
    log.info("warmed up %d calls: batch sizes %s, text lengths %s", len(plan), sizes, lengths)
    await _timed(state, "callcost", _call_costs(state, engine, lengths))

    state.phase = Phase.SELF_CHECK
    await _timed(state, "selfcheck", _on_worker(state, engine.self_check))

    lookahead_s = settings.lookahead_s(on_cuda=device.type == "cuda")
    stages = stages_per_kind(lookahead_s)
    buffers = await _on_worker(state, _staging_buffers, engine, settings.max_batch_size, stages)
    state.decoder = Decoder.serving(settings, manifest, metrics)
    state.monitor = HealthMonitor(
        worker=_worker(state),
        metrics=metrics,
        forward_timeout_s=settings.forward_timeout_s,
        max_failed_batches=settings.max_failed_batches,
        golden_check=engine.self_check,
        retry_after_s=settings.retry_after_s,
    )
    state.batcher = MicroBatcher(
        run=engine.execute,
        executor=_worker(state),
        buffers=buffers,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000,
        gather_s=settings.gather_ms / 1000,
        lookahead_s=lookahead_s,
        max_queue=settings.max_queue,
        metrics=metrics,
        on_batch=state.monitor.batch_done,
    )
    state.batcher.start()
    state.monitor.start(state.batcher)

    # What startup built (the model, torch's and the framework's objects) lives as long as the
    # process: frozen, the cyclic collector never scans it again. Unfrozen, the first full
    # collection after startup came during the first burst and stalled the event loop (and
    # /healthz) for 150-200 ms.
    gc.collect()
    gc.freeze()
    total = time.perf_counter() - begin
    metrics.startup.labels("total").set(total)
    metrics.model_info.labels(manifest.name, manifest.version, str(device)).set(1)
    state.phase = Phase.READY
    log.info("ready in %.2f s (%s)", total, ", ".join(f"{k} {v:.2f} s" for k, v in state.startup_seconds.items()))


async def _warm_up(state: AppState, engine: Engine, plan: list[WarmUp]) -> None:
    for step in plan:
        await _on_worker(state, engine.warm_up, step)


# Rows of the timed calls that fit the call cost, on a CPU: enough that the per-row and per-token
# costs show over the fixed one, few enough that the longest call stays a few milliseconds. A GPU
# hides the per-token cost of small batches, so there they run at the largest batch (cheap there).
CALL_COST_ROWS = 4


def call_cost_rows(device: torch.device, max_batch_size: int) -> int:
    return max_batch_size if device.type == "cuda" else min(CALL_COST_ROWS, max_batch_size)


async def _call_costs(state: AppState, engine: Engine, lengths: list[int]) -> None:
    """Set each text kind's call cost in padded tokens: from the settings, or measured here."""
    setting = state.settings.call_cost_tokens
    for kind in (kind for kind in Kind if kind.needs_text):
        if setting == "auto":
            rows = call_cost_rows(engine.device, state.settings.max_batch_size)
            cost = await _on_worker(state, engine.measure_call_cost, kind, lengths, rows)
        else:
            cost = math.inf if setting == "off" else float(setting)
        engine.call_cost_tokens[kind] = cost
        state.metrics.call_cost.labels(kind.value).set(cost)
    log.info(
        "one more forward call costs %s padded tokens (%s)",
        ", ".join(f"{kind.value} {cost:.0f}" for kind, cost in engine.call_cost_tokens.items() if kind.needs_text),
        "measured" if setting == "auto" else "set",
    )


def _staging_buffers(engine: Engine, max_batch_size: int, stages: int) -> dict[Kind, list[StageBuffers]]:
    """`stages` batch buffers per kind (one filling, one running, and the next batch's when it is
    handed over early), allocated by the engine (pinned on CUDA)."""
    shapes = MicroBatcher.buffer_shapes(max_batch_size, engine.manifest.image_size, engine.manifest.max_text_length)

    def pair(images: tuple[int, ...] | None, tokens: tuple[int, ...] | None) -> StageBuffers:
        return (
            engine.host_buffer(images, torch.uint8) if images else None,
            engine.host_buffer(tokens, torch.int64) if tokens else None,
        )

    return {kind: [pair(*shape) for _ in range(stages)] for kind, shape in shapes.items()}


def _worker(state: AppState) -> InferenceWorker:
    assert state.worker is not None
    return state.worker


async def _on_worker(state: AppState, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    future = _worker(state).submit(fn, *args, **kwargs)
    return await asyncio.wrap_future(future)


async def _timed(state: AppState, phase: str, work: Awaitable[T]) -> T:
    """Await one startup phase and record how long it took."""
    began = time.perf_counter()
    result = await work
    seconds = time.perf_counter() - began
    state.startup_seconds[phase] = seconds
    state.metrics.startup.labels(phase).set(seconds)
    return result
