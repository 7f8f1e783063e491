"""GET /info: the served model, the device and the batching settings."""

from __future__ import annotations

import math

from fastapi import APIRouter

from app.deps import StateDep
from app.errors import NotReady
from app.schemas import BatchingInfo, InfoResponse, LimitsInfo, ModelInfo, error_responses

router = APIRouter(tags=["info"])


@router.get("/info", summary="Model and serving configuration", responses=error_responses(401, 503))
async def info(state: StateDep) -> InfoResponse:
    manifest, engine, settings = state.manifest, state.engine, state.settings
    if manifest is None or engine is None:
        raise NotReady("the model is still loading", retry_after_s=settings.retry_after_s)
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
        precision=engine.precision,
        # Each field is the setting of the same name: one list of limits, in the schema.
        batching=BatchingInfo(
            **settings.model_dump(include=set(BatchingInfo.model_fields) - {"decode_workers", "call_cost_tokens"}),
            decode_workers=settings.decode_threads(),
            call_cost_tokens={
                kind.value: None if math.isinf(cost) else round(cost, 1)
                for kind, cost in engine.call_cost_tokens.items()
                if kind.needs_text
            },
        ),
        limits=LimitsInfo(**settings.model_dump(include=set(LimitsInfo.model_fields))),
    )
