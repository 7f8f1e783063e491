"""GET /info: the served model, the device and the batching settings.

A front-end process (`--frontends N`) answers with the device process's own /info, pushed to it
once the model is loaded.
"""

from __future__ import annotations

import math
import sys

from fastapi import APIRouter
from starlette.responses import Response

from app.config import MiB
from app.decode_pool import decode_nice_in_force
from app.deps import StateDep
from app.errors import NotReady
from app.schemas import BatchingInfo, InfoResponse, LimitsInfo, ModelInfo, error_responses
from app.state import AppState

# Batching fields whose value in force is not the setting as given.
_COMPUTED_BATCHING_FIELDS = frozenset(
    {
        "decode_workers",
        "decode_nice",
        "decode_memory_mb",
        "call_cost_tokens",
        "inline_decode_under_load",
        "lookahead_ms",
    }
)

router = APIRouter(tags=["info"])


@router.get(
    "/info",
    summary="Model and serving configuration",
    response_model=InfoResponse,
    responses=error_responses(401, 503),
)
async def info(state: StateDep) -> Response:
    body = state.link.device.info if state.link is not None else info_body(state)
    if not body:
        raise NotReady("the model is still loading", retry_after_s=state.settings.retry_after_s)
    return Response(body, media_type="application/json")


def info_body(state: AppState) -> bytes:
    """The device process's /info as JSON; empty until the model is loaded."""
    info = build_info(state)
    return info.model_dump_json().encode() if info is not None else b""


def build_info(state: AppState) -> InfoResponse | None:
    manifest, engine, settings = state.manifest, state.engine, state.settings
    if manifest is None or engine is None:
        return None
    return InfoResponse(
        model=ModelInfo(
            name=manifest.name,
            version=manifest.version,
            task=manifest.task,
            created=manifest.created,
            sha256=manifest.archive_sha256,
            labels=list(manifest.labels),
            image_size=list(manifest.image_size),
            max_text_length=manifest.max_text_length,
            embedding_dim=manifest.embedding_dim,
        ),
        device=str(engine.device),
        threads=settings.intra_op_threads(on_cuda=engine.device.type == "cuda"),
        switch_interval_ms=round(sys.getswitchinterval() * 1000, 6),
        precision=engine.precision,
        graph_optimized=engine.graph_optimized,
        # Each field is the setting of the same name: one list of limits, in the schema.
        batching=BatchingInfo(
            **settings.model_dump(include=set(BatchingInfo.model_fields) - _COMPUTED_BATCHING_FIELDS),
            decode_workers=settings.decode_threads(),
            decode_nice=decode_nice_in_force(settings),
            decode_memory_mb=round(settings.decode_memory_bytes() / MiB, 1),
            inline_decode_under_load=state.inline_under_load,
            lookahead_ms=settings.lookahead_s(on_cuda=engine.device.type == "cuda") * 1000,
            call_cost_tokens={
                kind.value: None if math.isinf(cost) else round(cost, 1)
                for kind, cost in engine.call_cost_tokens.items()
                if kind.needs_text
            },
        ),
        limits=LimitsInfo(**settings.model_dump(include=set(LimitsInfo.model_fields))),
    )
