"""Fixtures for the service: a probe model package, the app running through its lifespan, helpers.

In-process tests drive the real app through the ASGI lifespan protocol and httpx's ASGI
transport, on one event loop (`run`), so concurrency is real and nothing is mocked. End-to-end
tests start `python -m app` on 127.0.0.1 (see test_e2e.py).
"""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator, Awaitable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import torch
from fastapi import FastAPI
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from app.batching import MicroBatcher
from app.config import Settings
from app.main import create_app
from app.state import AppState
from model.export import PackageInfo, export_package, synthetic_golden_inputs
from tests.app.probe_model import ProbeModel
from tests.conftest import TEST_LABELS

T = TypeVar("T")


def export_test_model(model: torch.nn.Module, out: Path, name: str, version: str) -> Path:
    """A package of a small hand-written model: 32x32 images, texts up to 64 bytes, embeddings of 16."""
    info = PackageInfo(
        name=name,
        version=version,
        task="test",
        labels=TEST_LABELS,
        image_size=(32, 32),
        max_text_length=64,
        embedding_dim=16,
        metrics={},
        model_config={},
    )
    export_package(model, info, synthetic_golden_inputs(), out)
    return out


@pytest.fixture(scope="session")
def probe_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_test_model(
        ProbeModel(len(TEST_LABELS)), tmp_path_factory.mktemp("packages") / "probe", "probe", "1.2.3-probe"
    )


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
    """Run one async test body on a fresh event loop, with a hard timeout."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@dataclass
class Running:
    app: FastAPI
    client: httpx.AsyncClient

    @property
    def state(self) -> AppState:
        state: AppState = self.app.state.fusion
        return state

    @property
    def batcher(self) -> MicroBatcher:
        """The device process's own batcher (queue counts and all)."""
        batcher = self.state.batcher
        assert isinstance(batcher, MicroBatcher)
        return batcher

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = await self.client.get("/metrics")
        assert response.status_code == 200
        return parse_metrics(response.text)

    async def rows_seen(self) -> int:
        """The probe model's own count of rows it received (read on the inference thread)."""
        assert self.state.engine is not None and self.state.worker is not None
        module = self.state.engine.package.module
        future = self.state.worker.submit(lambda: int(module.rows_seen.item()))
        return await asyncio.wrap_future(future)


@asynccontextmanager
async def lifespan_running(app: FastAPI) -> AsyncIterator[None]:
    """Drive the app's ASGI lifespan, as a server does."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def send(message: Any) -> None:
        await outbox.put(message)

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
        await task


@asynccontextmanager
async def serve(settings: Settings, *, wait_ready: bool = True) -> AsyncIterator[Running]:
    app = create_app(settings)
    async with lifespan_running(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fusion.test", timeout=30) as client:
            running = Running(app, client)
            if wait_ready:
                await until(lambda: running.state.readiness() is None, timeout_s=30)
            yield running


async def until(condition: Any, timeout_s: float = 10, interval_s: float = 0.005) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not condition():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval_s)


def settings_for(package: Path, **overrides: Any) -> Settings:
    """Test settings: small batches, fast startup; the next batch handed over when the device frees
    (no --lookahead-ms), so that what is queued while a batch runs forms the next batch whatever a
    probe batch's duration (tests of the lookahead set it)."""
    values: dict[str, Any] = {
        "model": package,
        "max_batch_size": 8,
        "decode_workers": 2,
        "threads": 1,
        "lookahead_ms": 0,
    }
    values.update(overrides)
    return Settings(**values)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, /, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def picture(
    color: tuple[int, int, int] = (220, 40, 40),
    size: tuple[int, int] = (48, 48),
    fmt: str = "PNG",
    shape: str = "ellipse",
) -> bytes:
    image = Image.new("RGB", size, (230, 230, 230))
    draw = ImageDraw.Draw(image)
    box = [size[0] // 6, size[1] // 6, size[0] - size[0] // 6, size[1] - size[1] // 6]
    getattr(draw, shape)(box, fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def form(image: bytes | None = None, text: str | None = None, **fields: str) -> dict[str, Any]:
    """httpx keyword arguments for a real multipart/form-data body."""
    files: dict[str, Any] = {}
    if image is not None:
        files["image"] = ("picture", image, "application/octet-stream")
    data: dict[str, str] = dict(fields)
    if text is not None:
        data["text"] = text
    if not files:
        # httpx sends urlencoded without a file: force multipart with an empty, ignored part.
        files["unused"] = ("unused", b"", "application/octet-stream")
    return {"files": files, "data": data}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def gather(*awaitables: Awaitable[T]) -> list[T]:
    return list(await asyncio.gather(*awaitables))


BOUNDARY = "fusion-test-boundary"

FormPart = tuple[str, bytes] | tuple[str, bytes, dict[str, str]]


def multipart(*parts: FormPart, boundary: str = BOUNDARY) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body written byte by byte (no client library tidies it up), and its
    Content-Type header. A part is (name, data) or (name, data, extra or replacement headers)."""
    chunks = []
    for name, data, *extra in parts:
        headers = {"Content-Disposition": f'form-data; name="{name}"', **(extra[0] if extra else {})}
        head = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
        chunks.append(f"--{boundary}\r\n{head}\r\n".encode() + data + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def image_file(data: bytes, filename: str = "picture") -> FormPart:
    return ("image", data, {"Content-Disposition": f'form-data; name="image"; filename="{filename}"'})
