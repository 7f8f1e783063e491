"""create_app(settings) -> the FastAPI app: routes, error handlers, request context, lifespan.

Nothing is loaded here: the lifespan loads the model, so building an app is cheap and tests
build one per configuration. Serve it with `python -m app` (see app.__main__).
"""

from __future__ import annotations

from fastapi import FastAPI

from app import handlers
from app.config import Settings, get_settings
from app.lifespan import lifespan
from app.metrics import Metrics
from app.middleware import RequestContextMiddleware
from app.routes import api_router
from app.state import AppState

DESCRIPTION = """
Image+text fusion model serving with dynamic micro-batching.

* Every response carries `X-Request-ID` (echoed when sent) and, once loaded, `X-Model-Version`.
* `X-Request-Timeout-Ms` sets a request's deadline; a request still queued at its deadline is
  never run and gets 504.
* Errors have one shape, `{"error": {"code", "message", "request_id"}}`: 400 malformed request,
  413 too large, 415 not multipart/form-data or an image format outside the allowlist, 422 invalid
  field, 429 over the admission limit (`Retry-After`), 500 model failure on this request only,
  503 not ready (`Retry-After`), 504 deadline passed before the request ran.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = AppState(settings=settings, metrics=Metrics(settings.max_batch_size))
    app = FastAPI(title="fusionserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.fusion = state
    app.add_middleware(RequestContextMiddleware, state=state)
    handlers.install(app)
    app.include_router(api_router)
    return app
