"""POST /predict and /embed, answered from the middleware chain without FastAPI's router.

An inference request needs none of what the framework does per request: matching the path through
the included routers, solving the one dependency (the ready model), and passing through the
exception and exit-stack middlewares. Measured on the event loop at concurrency 1, that was about a
sixth of its Python time for a request; bench.compare, this against the framework's path, side by
side: throughput at concurrency 32 1.08x on the mix, 1.02x on the scenes, and the scenes' median at
concurrency 1 5.4 against 6.1 ms.

The routes stay declared in FastAPI (app.routes), which documents them in the OpenAPI schema and
answers every other method on their paths (405); these are the same endpoint functions, called
with the same arguments. A domain error gets the same answer as from the router's exception
handler, and anything else goes on to the request-context middleware's 500, as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ServiceError
from app.handlers import request_id_of, service_error_response
from app.state import AppState, Serving

Endpoint = Callable[[Request, Serving], Awaitable[Response]]


class DirectRoutes:
    def __init__(self, app: ASGIApp, state: AppState, endpoints: Mapping[str, Endpoint]) -> None:
        self.app = app
        self.state = state
        self.endpoints = dict(endpoints)  # plain paths, POST only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["route"] = scope["path"]  # the metrics label the router would have set
        try:
            response = await endpoint(Request(scope, receive, send), self.state.serving())
        except ServiceError as error:
            response = service_error_response(error, request_id_of(scope.get("state")))
        await response(scope, receive, send)
