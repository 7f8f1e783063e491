"""The HTTP API (DESIGN.md): inference routes, health checks, model info and metrics."""

from fastapi import APIRouter

from app.routes import embed, health, info, metrics, predict

# Served by app.direct_routes ahead of the router; declared in the router too, for the docs.
INFERENCE_ENDPOINTS = {"/predict": predict.predict, "/embed": embed.embed}
INFERENCE_PATHS = tuple(INFERENCE_ENDPOINTS)

api_router = APIRouter()
for module in (predict, embed, health, info, metrics):
    api_router.include_router(module.router)

__all__ = ["INFERENCE_ENDPOINTS", "INFERENCE_PATHS", "api_router"]
