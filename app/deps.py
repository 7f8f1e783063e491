"""Typed access to the app's state from a route."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.state import AppState, Serving

# `async def`, though nothing is awaited: FastAPI runs plain `def` dependencies in its threadpool,
# two thread hops per request for what is an attribute lookup.


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.fusion
    return state


async def get_serving(request: Request) -> Serving:
    """The ready model and its queue, or 503 Not Ready (with Retry-After)."""
    state: AppState = request.app.state.fusion
    return state.serving()


StateDep = Annotated[AppState, Depends(get_state)]
ServingDep = Annotated[Serving, Depends(get_serving)]
