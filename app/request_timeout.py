"""A request's time allowance, from its X-Request-Timeout-Ms header (or the default).

Read in two places: the route sets the request's deadline from it, and the load-shedding
middleware refuses, before the body is read, a request that the work queued ahead of it would
keep past that allowance. Both count it from the request's first byte (RECEIVED_AT in the ASGI
scope's state, set by app.protocol): the client's clock started when it sent the request, and
under load the event loop reads it a while after it arrived."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from app.config import Settings
from app.errors import DeadlineExceeded, InvalidInput
from app.metrics import Metrics

TIMEOUT_HEADER: Final = "x-request-timeout-ms"
RECEIVED_AT: Final = "received_at"


def deadline_of(state: Mapping[str, Any], allowed_s: float, now: float) -> float:
    """The request's deadline on the event loop's clock: `allowed_s` from its first byte (`now` for a
    request that did not come through app.protocol)."""
    received: float = state.get(RECEIVED_AT, now)
    return received + allowed_s


def expired_before_queue(metrics: Metrics) -> DeadlineExceeded:
    """The 504 for a request whose deadline passed before it reached the batch queue (at admission,
    while it decoded, or on the way to the device process), counted by stage. Not the queue's doing,
    so no lateness limit learns from it."""
    metrics.expired.labels("before_queue").inc()
    return DeadlineExceeded("the request's deadline passed before it could be queued")


def allowed_seconds(raw: str | None, settings: Settings) -> float:
    """Seconds the request allows; 422 `invalid_timeout` for a value that is not 1..max ms."""
    if raw is None:
        return settings.request_timeout_ms / 1000
    value = raw.strip()
    if not is_small_number(value) or not 1 <= int(value) <= settings.max_request_timeout_ms:
        raise InvalidInput(
            f"X-Request-Timeout-Ms must be an integer from 1 to {settings.max_request_timeout_ms}",
            code="invalid_timeout",
        )
    return int(value) / 1000


def is_small_number(text: str, digits: int = 9) -> bool:
    # ASCII only: str.isdigit() also accepts e.g. superscripts, which int() refuses.
    return 0 < len(text) <= digits and text.isascii() and text.isdigit()
