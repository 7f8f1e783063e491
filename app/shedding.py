"""Load shedding ahead of the framework: while the queue is full, or when the work queued ahead of
a request would keep it past its deadline (X-Request-Timeout-Ms), POST /predict and /embed are
refused here, before routing, dependency resolution and exception handling; so is one whose
deadline had passed before its headers were read (504).

Under a burst most requests are refused, and the refusals compete with the admitted requests and
the health checks for the one event loop. Through the framework a refusal cost about 0.4 ms here;
this way it costs a tenth of that, so a burst of ten times capacity is refused in tens of ms
and /healthz does not wait behind it. The answer is the same 429 (or 503 while shutting down)
that the route would give (or the 504); the route still checks admission itself, for requests that
pass here while there is room.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import InvalidInput
from app.handlers import request_id_of, service_error_response
from app.request_timeout import TIMEOUT_HEADER, allowed_seconds, deadline_of
from app.state import AppState


class ShedMiddleware:
    def __init__(self, app: ASGIApp, state: AppState, paths: Iterable[str]) -> None:
        self.app = app
        self.state = state
        self.paths = frozenset(paths)  # the inference routes (plain paths, no parameters)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        batcher = self.state.batcher
        shed = scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths
        times = self._left_and_allowance(scope) if shed and batcher is not None else None
        error = batcher.refusal(*times) if batcher is not None and times is not None else None
        if error is None:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["route"] = scope["path"]  # the metrics label the router would have set
        await service_error_response(error, request_id_of(scope.get("state")))(scope, receive, send)

    def _left_and_allowance(self, scope: Scope) -> tuple[float, float] | None:
        """What the request's deadline leaves it now (0 or less: passed already), and all the time
        it allows; None for an invalid header, which the route refuses (422) whatever the load."""
        raw = next((value for name, value in scope["headers"] if name == _TIMEOUT_HEADER), None)
        try:
            allowed = allowed_seconds(raw.decode("latin-1") if raw is not None else None, self.state.settings)
        except InvalidInput:
            return None
        now = asyncio.get_running_loop().time()
        return deadline_of(scope["state"], allowed, now) - now, allowed


_TIMEOUT_HEADER: Final = TIMEOUT_HEADER.encode()
