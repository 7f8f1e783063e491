"""The HTTP API (DESIGN.md): inference routes, health checks, model info and metrics."""

from fastapi import APIRouter

from app.routes import embed, health, info, metrics, predict

INFERENCE_PATHS = ("/predict", "/embed")

api_router = APIRouter()
for module in (predict, embed, health, info, metrics):
    api_router.include_router(module.router)

__all__ = ["INFERENCE_PATHS", "api_router"]
