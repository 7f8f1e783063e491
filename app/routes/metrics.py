"""GET /metrics: Prometheus text format, from this app instance's own registry.

With `--frontends N` every process answers for the whole replica (app.metrics_merge): the device
process merges its own with each front-end's; a front-end asks the device process for that.
"""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from app.deps import StateDep
from app.schemas import error_responses

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses=error_responses(401))
async def metrics(state: StateDep) -> Response:
    if state.link is not None:
        text = await state.link.metrics()
    elif state.handoff is not None:
        text = await state.handoff.render_metrics()
    else:
        text = state.metrics.render()
    return Response(text, media_type=CONTENT_TYPE_LATEST)
