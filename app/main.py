"""create_app(settings) -> the FastAPI app: routes, error handlers, request context, lifespan.

Nothing is loaded here: the lifespan loads the model, so building an app is cheap and tests
build one per configuration. Serve it with `python -m app` (see app.__main__).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI

from app import handlers
from app.auth import HEALTH_PATHS, ApiKeyMiddleware, load_api_keys
from app.config import Settings, get_settings
from app.direct_routes import DirectRoutes
from app.metrics import Metrics
from app.middleware import RequestContextMiddleware
from app.routes import INFERENCE_ENDPOINTS, INFERENCE_PATHS, api_router
from app.shedding import ShedMiddleware
from app.state import AppState

DESCRIPTION = """
Image+text fusion model serving with dynamic micro-batching.

* Every response carries `X-Request-ID` (echoed when sent) and, once loaded, `X-Model-Version`.
* `X-Request-Timeout-Ms` sets a request's deadline; a request still queued at its deadline is
  never run and gets 504.
* With API keys configured, every path but `/healthz` and `/readyz` needs
  `Authorization: Bearer KEY` or `X-API-Key: KEY` (401 otherwise).
* Errors have one shape, `{"error": {"code", "message", "request_id"}}`: 400 malformed request,
  401 no valid API key, 408 body too slow, 413 too large, 415 not multipart/form-data or an image
  format outside the allowlist, 422 invalid field, 429 over the admission limit (`Retry-After`),
  500 model failure on this request only (`out_of_memory` when it ran out of device memory even
  alone), 503 not ready (`Retry-After`), 504 deadline passed before the request ran.
"""


Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(settings: Settings | None = None, lifespan: Lifespan | None = None) -> FastAPI:
    """Raises ApiKeyError when API keys are configured but unusable. `lifespan`: the device
    process's (app.lifespan) unless given, as a front-end process (app.frontend) gives its own."""
    if lifespan is None:
        # Imported here, not at the top: it loads the model, and imports torch to do so, which
        # would cost a front-end process 280 MB and over a second for nothing.
        from app.lifespan import lifespan
    settings = settings or get_settings()
    keys = load_api_keys(settings)
    state = AppState(settings=settings, metrics=Metrics(settings.max_batch_size))
    app = FastAPI(
        title="fusionserve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # Off: no /docs, /redoc or /openapi.json at all (404), not merely hidden.
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.fusion = state
    handlers.install(app)
    app.include_router(api_router)
    # Outermost last: request context (X-Request-ID, metrics) -> API keys -> shedding -> the
    # inference routes -> the router (everything else). A 401 or an early 429 carries X-Request-ID
    # and is counted; a stranger is refused before a shed.
    app.add_middleware(DirectRoutes, state=state, endpoints=INFERENCE_ENDPOINTS)
    app.add_middleware(ShedMiddleware, state=state, paths=INFERENCE_PATHS)
    open_paths = HEALTH_PATHS if settings.metrics_require_key else HEALTH_PATHS | {"/metrics"}
    app.add_middleware(ApiKeyMiddleware, keys=keys, open_paths=open_paths)
    app.add_middleware(RequestContextMiddleware, state=state)
    return app
