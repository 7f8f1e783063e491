"""The request body budget: a body counts twice what has arrived of it; one whose declared length
does not fit is refused with 429 and Retry-After before it is read, one that stops fitting as it
arrives when it does; and a body's bytes are given back once it is decoded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.body_memory import BodyMemory
from app.errors import Overloaded
from app.metrics import Metrics
from tests.app.conftest import form, metric, picture, run, serve, settings_for

MiB = 2**20


def test_a_body_holds_twice_what_has_arrived_and_is_refused_by_its_declared_length_at_once() -> None:
    metrics = Metrics(max_batch_size=8)
    memory = BodyMemory(100 * MiB, metrics, retry_after_s=2)
    with memory.hold(30 * MiB) as declared:  # 60 MiB would fit: nothing held until it arrives
        assert memory.held_bytes == 0
        declared.arrived(20 * MiB)
        assert memory.held_bytes == 40 * MiB
        with pytest.raises(Overloaded) as refused, memory.hold(31 * MiB):  # 40 + 62 > 100
            pass
        assert refused.value.retry_after_s == 2
        assert str(refused.value) == (
            "the server holds 40.0 MiB for request bodies, of at most 100 MiB: this one does not fit now"
        )
        with memory.hold(None) as chunked:
            chunked.arrived(30 * MiB)
            assert memory.held_bytes == 100 * MiB
            with pytest.raises(Overloaded):
                chunked.arrived(30 * MiB + 1)
            assert memory.held_bytes == 100 * MiB
    assert memory.held_bytes == 0
    assert metrics.registry.get_sample_value("fusion_requests_shed_total", {"reason": "body_memory"}) == 2
    assert metrics.registry.get_sample_value("fusion_body_memory_bytes") == 0


def test_the_service_refuses_a_body_that_does_not_fit_and_serves_it_once_there_is_room(probe_package: Path) -> None:
    image = picture(size=(300, 300), fmt="BMP")  # 270 KB, past the inline limits: decoded in the pool
    settings = settings_for(probe_package, body_memory_mb=1, max_body_bytes=MiB // 2, max_image_bytes=MiB // 2)

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(data), 64 * 1024):
            yield data[start : start + 64 * 1024]
            await asyncio.sleep(0)

    async def body() -> None:
        async with serve(settings) as served:
            bodies = served.state.bodies
            assert bodies.capacity_bytes == MiB
            with bodies.hold(None) as other:
                other.arrived(300 * 1024)  # another request's body: 600 KiB held for it
                refused = await served.client.post("/predict", **form(image, "red circle"))
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"]["code"] == "overloaded"
                assert refused.json()["error"]["message"] == (
                    "the server holds 0.6 MiB for request bodies, of at most 1 MiB: this one does not fit now"
                )
                assert refused.headers["retry-after"] == "2"
                request = served.client.build_request("POST", "/predict", **form(image, "red circle"))
                content_type = {"content-type": request.headers["content-type"]}
                streamed = await served.client.post("/predict", content=chunks(request.read()), headers=content_type)
                assert streamed.status_code == 429, streamed.text
            assert bodies.held_bytes == 0
            served_now = await served.client.post("/predict", **form(image, "red circle"))
            assert served_now.status_code == 200, served_now.text
            assert bodies.held_bytes == 0
            info = (await served.client.get("/info")).json()
            samples = await served.metrics()
        assert info["limits"]["body_memory_mb"] == 1
        assert metric(samples, "fusion_requests_shed_total", reason="body_memory") == 2
        assert metric(samples, "fusion_body_memory_bytes") == 0

    run(body())
