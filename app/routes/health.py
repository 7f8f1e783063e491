"""GET /healthz (liveness) and GET /readyz (readiness): flags only, never behind inference.

Liveness: the process answers and its inference thread is alive (a failed startup is dead too: the
orchestrator should restart it). Readiness: loaded, warmed up, self-checked and not draining.
"""

from __future__ import annotations

import json

from fastapi import APIRouter
from starlette.responses import Response

from app.deps import StateDep
from app.schemas import HealthResponse, ReadinessResponse

router = APIRouter(tags=["health"])


def _answer(ok: bool, status: str, reason: str | None, retry_after_s: int) -> Response:
    body = {"status": status} if reason is None else {"status": status, "reason": reason}
    headers = None if ok else {"Retry-After": str(retry_after_s)}
    return Response(json.dumps(body), status_code=200 if ok else 503, media_type="application/json", headers=headers)


@router.get(
    "/healthz",
    summary="Liveness",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    responses={503: {"model": HealthResponse, "description": "dead: restart this process"}},
)
async def healthz(state: StateDep) -> Response:
    reason = state.liveness()
    return _answer(reason is None, "alive" if reason is None else "dead", reason, state.settings.retry_after_s)


@router.get(
    "/readyz",
    summary="Readiness",
    response_model=ReadinessResponse,
    response_model_exclude_none=True,
    responses={503: {"model": ReadinessResponse, "description": "not ready: send no traffic (reason given)"}},
)
async def readyz(state: StateDep) -> Response:
    reason = state.readiness()
    return _answer(reason is None, "ready" if reason is None else "not_ready", reason, state.settings.retry_after_s)
