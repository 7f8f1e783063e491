"""The decode memory budget: images decoding in the pool hold their estimated bytes, wait in
arrival order while others hold too much, give up at their deadline (504), and an image that alone
needs more than the budget is refused (413) before a pixel is decoded."""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.decode_memory import DecodeMemory
from app.errors import DeadlineExceeded, DecodeTooLarge
from app.metrics import Metrics
from model.preprocess import decode_bytes
from tests.app.conftest import form, metric, run, serve, settings_for, until
from tests.app.servers import SERVER_ARGS, running_server

MiB = 2**20


def budget(capacity: int) -> tuple[DecodeMemory, Metrics]:
    metrics = Metrics(max_batch_size=8)
    return DecodeMemory(capacity, metrics), metrics


def holder(memory: DecodeMemory, needed: int, order: list[str], name: str) -> threading.Thread:
    """A decode thread that holds `needed`, notes its turn, and gives it back."""

    def body() -> None:
        held = memory.hold((1, 1), needed, time.monotonic() + 10)
        order.append(name)
        memory.release(held)

    thread = threading.Thread(target=body)
    thread.start()
    return thread


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def waits(metrics: Metrics) -> float:
    return sample(metrics, "fusion_decode_memory_waits_total")


def wait_for(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.001)


def test_images_wait_in_arrival_order_while_the_budget_is_held() -> None:
    memory, metrics = budget(100)
    first = memory.hold((1, 1), 60, None)
    order: list[str] = []
    large = holder(memory, 60, order, "large")
    wait_for(lambda: waits(metrics) == 1)
    # 10 bytes would fit beside the first 60, but the large image came first: it is not passed over.
    small = holder(memory, 10, order, "small")
    wait_for(lambda: waits(metrics) == 2)
    assert order == [] and memory.held_bytes == 60
    memory.release(first)
    large.join(10)
    small.join(10)
    assert order == ["large", "small"]
    assert memory.held_bytes == 0


def test_an_image_needing_more_than_the_whole_budget_is_refused_at_once() -> None:
    memory, metrics = budget(768 * MiB)
    with pytest.raises(DecodeTooLarge) as refused:
        memory.hold((8660, 5773), 962 * MiB, None)
    assert refused.value.code == "image_too_large"
    assert str(refused.value) == (
        "the image (8660x5773) would take 962 MiB to decode; this server decodes images of at most 768 MiB"
        " (send it smaller, or as JPEG)"
    )
    assert memory.held_bytes == 0 and waits(metrics) == 0


def test_a_wait_ends_at_the_deadline_and_leaves_the_line() -> None:
    memory, metrics = budget(100)
    first = memory.hold((1, 1), 80, None)
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        memory.hold((1, 1), 30, began + 0.05)
    assert time.monotonic() - began >= 0.05
    assert sample(metrics, "fusion_requests_expired_total", stage="decode_memory") == 1
    assert memory.hold((1, 1), 20, None) == 20  # the one that gave up no longer stands first in line
    assert memory.held_bytes == 100
    memory.release(first)
    memory.release(20)
    assert memory.held_bytes == 0


def transparent_png(width: int, height: int) -> bytes:
    rows, columns = np.indices((height, width))
    pixels = np.stack([rows % 256, columns % 256, (rows + columns) % 256, (columns % 2) * 255], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGBA").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def test_the_service_makes_a_large_image_wait_for_memory_and_refuses_one_over_the_budget(
    probe_package: Path,
) -> None:
    large = transparent_png(1000, 800)  # 0.8 megapixels, past --inline-decode-pixels: the pool decodes it
    needed = decode_bytes(Image.open(io.BytesIO(large)))
    assert needed == 1000 * 800 * 20 + 8 * MiB
    larger = transparent_png(2000, 1000)

    async def body() -> None:
        async with serve(settings_for(probe_package, decode_memory_mb=24)) as served:
            assert served.state.decoder is not None
            memory = served.state.decoder.memory
            assert memory is not None and memory.capacity_bytes == 24 * MiB
            loop = asyncio.get_running_loop()
            # Another image holds all but 1 MiB of the budget (held from a thread, as a decode does).
            other = await loop.run_in_executor(None, memory.hold, (1, 1), 23 * MiB, None)
            answer = asyncio.ensure_future(served.client.post("/predict", **form(large, "red circle")))
            await until(lambda: waits(served.state.metrics) == 1)
            assert not answer.done() and memory.held_bytes == 23 * MiB
            memory.release(other)
            ok = await answer
            assert ok.status_code == 200, ok.text

            # The deadline passes in the line: 504, and the budget is as it was.
            other = await loop.run_in_executor(None, memory.hold, (1, 1), 23 * MiB, None)
            late = await served.client.post(
                "/predict", **form(large, "red circle"), headers={"X-Request-Timeout-Ms": "200"}
            )
            memory.release(other)
            assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"

            over = await served.client.post("/predict", **form(larger, "red circle"))
            assert over.status_code == 413
            assert over.json()["error"]["code"] == "image_too_large"
            assert "connection" not in over.headers  # the body was read whole: the connection goes on
            assert over.json()["error"]["message"] == (
                "the image (2000x1000) would take 46 MiB to decode; this server decodes images of at most 24 MiB"
                " (send it smaller, or as JPEG)"
            )
            info = (await served.client.get("/info")).json()
            assert info["batching"]["decode_memory_mb"] == 24
            samples = await served.metrics()
        assert metric(samples, "fusion_decode_memory_waits_total") == 2
        assert metric(samples, "fusion_requests_expired_total", stage="decode_memory") == 1
        assert metric(samples, "fusion_decode_memory_bytes") == 0

    run(body())


def high_water_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM, Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM is Linux's")
def test_a_served_replica_peaks_at_one_large_decode_when_the_budget_holds_one(
    probe_package: Path, tmp_path: Path
) -> None:
    """Two decode threads, four 7.8-megapixel transparent PNGs at once: without the budget both
    threads decode at once, and each thread's malloc arena keeps what its decode freed, so the
    peak is two decodes whatever their order; with a budget of one, it is one."""
    large = transparent_png(2800, 2800)
    needed = decode_bytes(Image.open(io.BytesIO(large))) / MiB  # 157.5 MiB
    with running_server(probe_package, tmp_path, *SERVER_ARGS, "--decode-memory-mb", "160") as server:
        assert httpx.post(f"{server.url}/predict", **form(transparent_png(64, 64), "warm"), timeout=30).is_success
        before = high_water_mib(server.process.pid)
        # One at a time, on a busy machine the last of four may wait past the default 10 s deadline.
        patient: dict[str, Any] = {"headers": {"X-Request-Timeout-Ms": "120000"}, "timeout": 180}

        def post(_: int) -> httpx.Response:
            return httpx.post(f"{server.url}/predict", **form(large, "red circle"), **patient)

        with ThreadPoolExecutor(4) as clients:
            answers = list(clients.map(post, range(4)))
        growth = high_water_mib(server.process.pid) - before
        samples = server.metrics()
    assert [answer.status_code for answer in answers] == [200] * 4
    assert metric(samples, "fusion_decode_memory_waits_total") == 3
    assert needed * 0.9 < growth < needed * 1.3, f"peak grew {growth:.0f} MiB; one decode takes {needed:.0f} MiB"
