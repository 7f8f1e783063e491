"""Every input limit at both sides of its boundary: exactly at the limit is served, one over is not.

One app, small limits, real multipart bytes written by hand (so that sizes are exact). The slow
client limits (header and body time, header bytes) need real sockets: see test_robustness_e2e.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.forms import MAX_PART_HEADER_BYTES
from tests.app.conftest import FormPart, image_file, multipart, picture, run, serve, settings_for
from tests.conftest import TEST_LABELS

LIMITS: dict[str, Any] = {
    "max_body_bytes": 16384,
    "max_image_bytes": 4096,
    "max_text_bytes": 32,
    "max_parts": 4,
    "max_image_pixels": 2400,
    "max_image_side": 60,
    "max_image_aspect": 4.0,
    "max_request_timeout_ms": 60_000,
}


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def padded(data: bytes, size: int) -> bytes:
    """A PNG of exactly `size` bytes: decoders stop at IEND and ignore what follows."""
    assert len(data) <= size
    return data + b"\0" * (size - len(data))


IMAGE = png(32, 32)
TEXT = b"What shape?"


def body_of(size: int) -> tuple[bytes, dict[str, str]]:
    """A good form of exactly `size` bytes, padded by a field the route does not take."""
    base, headers = multipart(image_file(IMAGE), ("text", TEXT), ("pad", b""))
    body, headers = multipart(image_file(IMAGE), ("text", TEXT), ("pad", b"p" * (size - len(base))))
    assert len(body) == size
    return body, headers


def with_part_headers(size: int) -> tuple[bytes, dict[str, str]]:
    """The text part's header names and values add up to exactly `size` bytes (in two padding
    headers: python-multipart refuses any one header line over 4224 bytes by itself)."""
    disposition = 'form-data; name="text"'
    pad = size - len("Content-Disposition") - len(disposition) - 2 * len("X-Pad-1")
    padding = {"X-Pad-1": "p" * (pad // 2), "X-Pad-2": "p" * (pad - pad // 2)}
    return multipart(image_file(IMAGE), ("text", TEXT, padding))


def form_of(*parts: FormPart) -> tuple[bytes, dict[str, str]]:
    return multipart(*parts)


@dataclass(frozen=True)
class Boundary:
    name: str
    at_limit: Callable[[], tuple[bytes, dict[str, str]]]
    over: Callable[[], tuple[bytes, dict[str, str]]]
    status: int  # of the request one over the limit
    code: str
    chunked: bool = False  # send the body without a Content-Length


BOUNDARIES = [
    Boundary("body, declared", lambda: body_of(16384), lambda: body_of(16385), 413, "payload_too_large"),
    Boundary("body, streamed", lambda: body_of(16384), lambda: body_of(16385), 413, "payload_too_large", chunked=True),
    Boundary(
        "image bytes",
        lambda: form_of(image_file(padded(IMAGE, 4096)), ("text", TEXT)),
        lambda: form_of(image_file(padded(IMAGE, 4097)), ("text", TEXT)),
        413,
        "image_too_large",
    ),
    Boundary(
        "text bytes",
        lambda: form_of(image_file(IMAGE), ("text", b"q" * 32)),
        lambda: form_of(image_file(IMAGE), ("text", b"q" * 33)),
        422,
        "text_too_long",
    ),
    Boundary(
        "parts",
        lambda: form_of(image_file(IMAGE), ("text", TEXT), ("a", b"1"), ("b", b"2")),
        lambda: form_of(image_file(IMAGE), ("text", TEXT), ("a", b"1"), ("b", b"2"), ("c", b"3")),
        413,
        "too_many_parts",
    ),
    Boundary(
        "part header bytes",
        lambda: with_part_headers(MAX_PART_HEADER_BYTES),
        lambda: with_part_headers(MAX_PART_HEADER_BYTES + 1),
        400,
        "malformed_request",
    ),
    Boundary(
        "pixels (and the longest side, 60)",
        lambda: form_of(image_file(png(60, 40)), ("text", TEXT)),
        lambda: form_of(image_file(png(49, 49)), ("text", TEXT)),
        422,
        "image_dimensions",
    ),
    Boundary(
        "longest side",
        lambda: form_of(image_file(png(60, 30)), ("text", TEXT)),
        lambda: form_of(image_file(png(61, 30)), ("text", TEXT)),
        422,
        "image_dimensions",
    ),
    Boundary(
        "aspect ratio",
        lambda: form_of(image_file(png(40, 10)), ("text", TEXT)),
        lambda: form_of(image_file(png(41, 10)), ("text", TEXT)),
        422,
        "image_dimensions",
    ),
    Boundary(
        "top_k",
        lambda: form_of(image_file(IMAGE), ("text", TEXT), ("top_k", str(len(TEST_LABELS)).encode())),
        lambda: form_of(image_file(IMAGE), ("text", TEXT), ("top_k", str(len(TEST_LABELS) + 1).encode())),
        422,
        "invalid_top_k",
    ),
]


async def stream(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 1000):
        yield body[start : start + 1000]


async def send(client: httpx.AsyncClient, boundary: Boundary, build: Callable[[], Any]) -> httpx.Response:
    body, headers = build()
    content = stream(body) if boundary.chunked else body
    return await client.post("/predict", content=content, headers=headers)


@pytest.mark.parametrize("boundary", BOUNDARIES, ids=[b.name for b in BOUNDARIES])
def test_at_the_limit_is_served_and_one_over_is_refused(probe_package: Path, boundary: Boundary) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package, **LIMITS)) as served:
            at_limit = await send(served.client, boundary, boundary.at_limit)
            assert at_limit.status_code == 200, at_limit.text
            assert at_limit.json()["model"]["name"] == "probe"
            over = await send(served.client, boundary, boundary.over)
            assert over.status_code == boundary.status, over.text
            assert over.json()["error"]["code"] == boundary.code

    run(body())


def test_the_deadline_header_at_its_limit(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package, **LIMITS)) as served:
            content, headers = form_of(image_file(IMAGE), ("text", TEXT))
            at_limit = await served.client.post(
                "/predict", content=content, headers={**headers, "X-Request-Timeout-Ms": "60000"}
            )
            assert at_limit.status_code == 200
            over = await served.client.post(
                "/predict", content=content, headers={**headers, "X-Request-Timeout-Ms": "60001"}
            )
            assert over.status_code == 422 and over.json()["error"]["code"] == "invalid_timeout"

    run(body())


def test_oversized_answers_close_the_connection(probe_package: Path) -> None:
    """413 (and 408) leave the rest of the body unread: the connection cannot carry another request."""

    async def body() -> None:
        async with serve(settings_for(probe_package, **LIMITS)) as served:
            content, headers = body_of(16385)
            refused = await served.client.post("/predict", content=content, headers=headers)
            assert refused.status_code == 413 and refused.headers["connection"] == "close"
            content, headers = form_of(image_file(picture()), ("text", TEXT))
            served_ok = await served.client.post("/predict", content=content, headers=headers)
            assert served_ok.status_code == 200 and "connection" not in served_ok.headers

    run(body())
