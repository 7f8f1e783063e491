"""The decode memory budget: images decoding in the pool hold their estimated bytes, wait in
arrival order while others hold too much, give up at their deadline (504), and an image that alone
needs more than the budget is refused (413) before a pixel is decoded."""

from __future__ import annotations

import asyncio
import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.decode_memory import DecodeMemory, MustWait
from app.errors import ClientGone, DeadlineExceeded, DecodeTooLarge
from app.metrics import Metrics
from model.preprocess import decode_bytes
from tests.app.conftest import form, metric, run, serve, settings_for, until
from tests.app.servers import SERVER_ARGS, running_server

MiB = 2**20


def budget(capacity: int) -> tuple[DecodeMemory, Metrics]:
    metrics = Metrics(max_batch_size=8)
    return DecodeMemory(capacity, metrics, asyncio.get_running_loop()), metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def waits(metrics: Metrics) -> float:
    return sample(metrics, "fusion_decode_memory_waits_total")


def test_images_wait_in_arrival_order_on_the_loop_while_the_budget_is_held() -> None:
    async def body() -> None:
        memory, metrics = budget(100)
        loop = asyncio.get_running_loop()
        memory.take((1, 1), 60)
        order: list[str] = []

        async def waiter(needed: int, name: str) -> None:
            with pytest.raises(MustWait):  # as a decode thread finds it
                memory.take((1, 1), needed)
            await memory.wait(needed, loop.time() + 10)
            order.append(name)

        large = asyncio.ensure_future(waiter(60, "large"))
        await until(lambda: waits(metrics) == 1)
        # 10 bytes would fit beside the first 60, but the large image came first: it is not passed over.
        small = asyncio.ensure_future(waiter(10, "small"))
        await until(lambda: waits(metrics) == 2)
        assert order == [] and memory.held_bytes == 60
        await loop.run_in_executor(None, memory.release, 60)  # a decode thread ends
        await asyncio.gather(large, small)
        assert order == ["large", "small"] and memory.held_bytes == 70  # held for them, until their decodes end
        memory.release(60)
        memory.release(10)
        assert memory.held_bytes == 0

    run(body())


def test_an_image_needing_more_than_the_whole_budget_is_refused_at_once() -> None:
    async def body() -> None:
        memory, metrics = budget(768 * MiB)
        with pytest.raises(DecodeTooLarge) as refused:
            memory.take((8660, 5773), 962 * MiB)
        assert refused.value.code == "image_too_large"
        assert str(refused.value) == (
            "the image (8660x5773) would take 962 MiB to decode; this server decodes images of at most 768 MiB"
            " (send it smaller, or as JPEG)"
        )
        assert memory.held_bytes == 0 and waits(metrics) == 0

    run(body())


def test_a_wait_ends_at_the_deadline_and_leaves_the_line() -> None:
    async def body() -> None:
        memory, metrics = budget(100)
        loop = asyncio.get_running_loop()
        memory.take((1, 1), 80)
        began = loop.time()
        with pytest.raises(DeadlineExceeded):
            await memory.wait(30, began + 0.05)
        assert loop.time() - began >= 0.05
        assert sample(metrics, "fusion_requests_expired_total", stage="decode_memory") == 1
        memory.take((1, 1), 20)  # the one that gave up no longer stands first in line
        assert memory.held_bytes == 100
        memory.release(80)
        memory.release(20)
        assert memory.held_bytes == 0

    run(body())


def test_a_waiter_cancelled_after_its_grant_gives_the_bytes_back() -> None:
    async def body() -> None:
        memory, _ = budget(100)
        loop = asyncio.get_running_loop()
        memory.take((1, 1), 80)
        waiting = asyncio.ensure_future(memory.wait(50, loop.time() + 10))
        await asyncio.sleep(0)
        memory.release(80)
        await asyncio.sleep(0)  # the grant runs on the loop, before the waiter resumes
        assert memory.held_bytes == 50
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert memory.held_bytes == 0

    run(body())


def test_a_waiter_whose_client_leaves_gives_up_its_place() -> None:
    """Its large image would be decoded for nobody: 499, counted as cancelled, and the line moves on."""

    async def body() -> None:
        memory, metrics = budget(100)
        loop = asyncio.get_running_loop()
        memory.take((1, 1), 80)
        gone: asyncio.Future[None] = loop.create_future()
        leaving = asyncio.ensure_future(memory.wait(50, loop.time() + 10, gone))
        behind = asyncio.ensure_future(memory.wait(20, loop.time() + 10))
        await until(lambda: waits(metrics) == 2)
        gone.set_result(None)  # the client disconnects
        with pytest.raises(ClientGone):
            await leaving
        await behind  # 80 + 20 fit once the one ahead has left the line
        assert memory.held_bytes == 100
        assert sample(metrics, "fusion_requests_cancelled_total", reason="client_disconnected") == 1

    run(body())


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

    # No inline decoding: every request decodes in the pool (two threads), as on a GPU host.
    settings = settings_for(probe_package, decode_memory_mb=24, inline_decode_bytes=0)

    async def body() -> None:
        async with serve(settings) as served:
            assert served.state.decoder is not None
            memory = served.state.decoder.memory
            assert memory is not None and memory.capacity_bytes == 24 * MiB
            # Another image holds all but 1 MiB of the budget (taken as a decode thread takes it).
            other = 23 * MiB
            memory.take((1, 1), other)
            answers = [asyncio.ensure_future(served.client.post("/predict", **form(large, "red circle"))) for _ in "ab"]
            await until(lambda: waits(served.state.metrics) == 2)
            assert not any(answer.done() for answer in answers) and memory.held_bytes == 23 * MiB
            # Both wait on the event loop, not in the pool's two threads: a text decodes meanwhile.
            text_only = await served.client.post("/embed", **form(text="red circle"))
            assert text_only.status_code == 200, text_only.text
            memory.release(other)
            for answer in answers:
                ok = await answer
                assert ok.status_code == 200, ok.text

            # The deadline passes in the line: 504, and the budget is as it was.
            other = 23 * MiB
            memory.take((1, 1), other)
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
        assert metric(samples, "fusion_decode_memory_waits_total") == 3
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
