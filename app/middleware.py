"""Per-request context around every route, as plain ASGI (no per-request task or body copy).

- X-Request-ID: echoed when the client sent a safe one, generated otherwise; on every response.
- X-Model-Version: on every response once the package is loaded.
- Connection: close while draining, so keep-alive clients reconnect (and reach another replica)
  instead of holding a connection the listener is about to drop.
- Requests counted by route template and status; end-to-end latency observed.
- An exception no handler took becomes a 500 in the one error shape, with no traceback.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.handlers import error_response
from app.request_ids import new_request_id
from app.state import AppState

log = logging.getLogger(__name__)

REQUEST_ID: Final = "X-Request-ID"
MODEL_VERSION: Final = "X-Model-Version"
# Any visible ASCII (a UUID, an AWS trace id with its `=` and `;`, base64 with `+/=`): no space or
# control character, so it cannot split a log line or a header; bounded, so it cannot bloat them.
_SAFE_ID: Final = re.compile(rb"[!-~]{1,200}")


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return value.decode("ascii") if _SAFE_ID.fullmatch(value) else None
    return None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        request_id = _client_request_id(scope) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False

        async def send_with_context(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message["headers"] = [*message.get("headers", []), *self._headers(request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_context)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if not started:
                response = error_response(500, "internal_error", "internal server error", request_id)
                await response(scope, receive, send_with_context)
        finally:
            # The router's template; a request refused before routing (app.shedding) names its path.
            route = getattr(scope.get("route"), "path", None) or scope["state"].get("route", "unmatched")
            self.state.metrics.requests.labels(route, str(status)).inc()
            self.state.metrics.latency.labels(route).observe(time.perf_counter() - began)

    def _headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        headers = [(b"x-request-id", request_id.encode("ascii"))]
        version = self.state.model_version
        if version is not None:
            headers.append((b"x-model-version", version.encode("utf-8")))
        if self.state.draining:
            headers.append((b"connection", b"close"))
        return headers
