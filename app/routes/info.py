"""GET /info: the served model, the device and the batching settings."""

from __future__ import annotations

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
        batching=BatchingInfo(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            decode_workers=settings.decode_threads(),
            request_timeout_ms=settings.request_timeout_ms,
            max_request_timeout_ms=settings.max_request_timeout_ms,
        ),
        limits=LimitsInfo(
            max_body_bytes=settings.max_body_bytes,
            max_image_bytes=settings.max_image_bytes,
            max_text_bytes=settings.max_text_bytes,
            max_parts=settings.max_parts,
            max_image_pixels=settings.max_image_pixels,
            max_image_side=settings.max_image_side,
            max_image_aspect=settings.max_image_aspect,
            max_header_bytes=settings.max_header_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            forward_timeout_s=settings.forward_timeout_s,
        ),
    )
