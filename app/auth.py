"""Optional API keys, checked before anything else a request could cost (routing, body, queue).

With no key configured the service is open (it is meant to sit behind a gateway or a private
network). With keys, every path needs one except the health checks, which the load balancer and
the orchestrator call without credentials, and /metrics when `metrics_require_key` is off.
Unknown paths need a key too, so the route table is not disclosed to strangers.

A key travels as `Authorization: Bearer KEY` or `X-API-Key: KEY`. Keys are compared through
their SHA-256 digests with `hmac.compare_digest`, against every configured key without stopping
at a match: the time taken says nothing about how much of a key was right, nor about its length.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.errors import Unauthorized
from app.handlers import request_id_of, service_error_response

HEALTH_PATHS: Final = frozenset({"/healthz", "/readyz"})
MIN_KEY_LENGTH: Final = 16
# Printable ASCII without spaces or commas: safe in a header, and FUSION_API_KEYS is comma-separated.
_KEY: Final = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
_REALM: Final = 'Bearer realm="fusionserve"'
_INVALID: Final = _REALM + ', error="invalid_token"'  # RFC 6750: a key was sent and is wrong


class ApiKeyError(ValueError):
    """The configured keys cannot be used; the message never contains a key."""


def load_api_keys(settings: Settings) -> list[str]:
    """The keys from --api-keys and --api-keys-file, validated; empty when access is open."""
    keys = [key.get_secret_value() for key in settings.api_keys]
    if settings.api_keys_file is not None:
        keys += _read_key_file(settings.api_keys_file)
    for number, key in enumerate(keys, 1):
        if len(key) < MIN_KEY_LENGTH or not _KEY.fullmatch(key):
            raise ApiKeyError(
                f"API key {number} is not usable: keys are at least {MIN_KEY_LENGTH} printable ASCII characters, "
                "without spaces or commas"
            )
    return keys


def _read_key_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyError(f"cannot read the API key file {path}: {type(exc).__name__}") from exc
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ApiKeyError(f"the API key file {path} holds no key")
    return keys


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ApiKeyMiddleware:
    """401 for a request without a valid key (when keys are configured); the rest pass through."""

    def __init__(self, app: ASGIApp, keys: Iterable[str], open_paths: Iterable[str] = HEALTH_PATHS) -> None:
        self.app = app
        self.digests = [_digest(key.encode("ascii")) for key in keys]
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.digests or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = presented_keys(scope["headers"])
        if presented and any([self._valid(key) for key in presented]):  # a list: check every one
            await self.app(scope, receive, send)
            return
        error = (
            Unauthorized("the API key is not valid", code="invalid_api_key", headers={"WWW-Authenticate": _INVALID})
            if presented
            else Unauthorized(
                "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                headers={"WWW-Authenticate": _REALM},
            )
        )
        await service_error_response(error, request_id_of(scope.get("state")))(scope, receive, send)

    def _valid(self, key: bytes) -> bool:
        digest = _digest(key)
        matched = False
        for known in self.digests:
            matched |= hmac.compare_digest(digest, known)
        return matched


def presented_keys(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """Keys a request presents: a Bearer credential and an X-API-Key header, when sent."""
    keys = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credential = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credential.strip():
                keys.append(credential.strip())
        elif name == b"x-api-key" and value.strip():
            keys.append(value.strip())
    return keys
