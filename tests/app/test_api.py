"""Every endpoint through the app's lifespan, with real multipart bodies: answers and the error table."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from app.errors import STATUS
from app.items import Kind
from model.package import load_package
from model.preprocess import decode_image, tokenize
from tests.app.conftest import form, metric, picture, run, serve, settings_for, until
from tests.conftest import TEST_LABELS


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The one error shape, the status from the table, the request id, and nothing echoed back."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    error: dict[str, Any] = body["error"]
    return error


def expected_outputs(package: Path, image: bytes, text: str) -> dict[str, torch.Tensor]:
    """What the model itself says for one input, computed outside the service."""
    loaded = load_package(package)
    pixels = torch.from_numpy(decode_image(image, loaded.manifest.image_size)).unsqueeze(0)
    tokens = torch.from_numpy(tokenize(text, loaded.manifest.max_text_length).ids).unsqueeze(0)
    with torch.inference_mode():
        outputs: dict[str, torch.Tensor] = loaded.module(pixels, tokens)
        outputs["probs"] = torch.softmax(outputs["logits"], dim=-1)
        outputs["encode_image"] = loaded.module.encode_image(pixels)
        outputs["encode_text"] = loaded.module.encode_text(tokens)
    return {name: value[0] for name, value in outputs.items()}


def test_predict_answers_what_the_model_says(tiny_package: Path) -> None:
    image, text = picture(color=(40, 80, 220), fmt="JPEG"), "What colour is the object?"
    expected = expected_outputs(tiny_package, image, text)

    async def body() -> None:
        async with serve(settings_for(tiny_package)) as served:
            response = await served.client.post("/predict", **form(image, text, top_k="3"))
            assert response.status_code == 200, response.text
            answer = response.json()
            order = torch.argsort(expected["probs"], descending=True, stable=True)[:3].tolist()
            assert [entry["label"] for entry in answer["top_k"]] == [TEST_LABELS[i] for i in order]
            assert answer["label"] == TEST_LABELS[order[0]]
            assert answer["score"] == answer["top_k"][0]["score"]
            scores = [entry["score"] for entry in answer["top_k"]]
            np.testing.assert_allclose(scores, expected["probs"][order].numpy(), atol=1e-5)
            assert answer["model"] == {"name": "tiny", "version": "0.0.0+random.0"}
            assert set(answer) == {"label", "score", "top_k", "model"}
            assert response.headers["x-model-version"] == "0.0.0+random.0"
            assert len(response.headers["x-request-id"]) == 32

    run(body())


def test_a_lone_cheap_request_decodes_on_the_loop_with_the_same_answer(tiny_package: Path) -> None:
    small = picture(fmt="JPEG")
    wide = picture(size=(1024, 1024), fmt="PNG")  # a small body, but a million pixels to decode
    heavy = picture(size=(200, 200), fmt="PNG") + b"\0" * 64 * 1024  # few pixels, a body over the limit
    assert len(wide) < 16 * 1024 and len(heavy) > 64 * 1024

    async def answers(inline_decode_bytes: int) -> tuple[list[httpx.Response], dict[Any, float]]:
        settings = settings_for(tiny_package, inline_decode_bytes=inline_decode_bytes, inline_decode_pixels=300 * 300)
        async with serve(settings) as served:
            responses = [
                await served.client.post("/predict", **form(small, "q")),
                await served.client.post("/embed", **form(small, "q")),
                await served.client.post("/predict", **form(wide, "q")),
                await served.client.post("/predict", **form(heavy, "q")),
                await served.client.post("/predict", **form(b"not an image", "q")),
            ]
            return responses, await served.metrics()

    async def body() -> None:
        inline, on_loop = await answers(len(heavy) - 1)
        pooled, in_pool = await answers(0)
        assert [r.status_code for r in inline] == [200, 200, 200, 200, 415]
        assert [r.json() for r in inline[:4]] == [r.json() for r in pooled[:4]]
        assert inline[4].json()["error"]["code"] == pooled[4].json()["error"]["code"] == "unsupported_format"
        # On the loop: the small requests and the small bad one; the pool took the one with a
        # million pixels (after reading its header) and the one with a body over the limit.
        assert metric(on_loop, "fusion_decoded_on_loop_total", route="/predict") == 2
        assert metric(on_loop, "fusion_decoded_on_loop_total", route="/embed") == 1
        assert metric(on_loop, "fusion_decode_duration_seconds_count", route="/predict") == 3
        assert metric(in_pool, "fusion_decoded_on_loop_total", route="/predict") == 0
        assert metric(in_pool, "fusion_decode_duration_seconds_count", route="/predict") == 3

    run(body())


@pytest.mark.parametrize(("setting", "under_load"), [(False, False), (True, True), (None, True)])
def test_a_request_arriving_while_another_runs_decodes_on_the_loop_on_a_cpu(
    probe_package: Path, setting: bool | None, under_load: bool
) -> None:
    """By default (None) on the CPU, and with the setting on: on the loop; with it off: in the pool."""

    async def body() -> None:
        async with serve(settings_for(probe_package, inline_decode_under_load=setting)) as served:
            batcher = served.batcher
            assert batcher is not None
            slow = asyncio.ensure_future(served.client.post("/predict", **form(picture(), "#" * 60)))
            await until(lambda: batcher.running == 1)
            beside = await served.client.post("/predict", **form(picture(), "q"))  # sent while it runs
            assert beside.status_code == 200 and (await slow).status_code == 200
            samples = await served.metrics()
            info = (await served.client.get("/info")).json()
        # The slow one decoded alone, on the loop; the one beside it in the pool, unless the inline
        # limits apply under load too.
        assert metric(samples, "fusion_decoded_on_loop_total", route="/predict") == (2 if under_load else 1)
        assert metric(samples, "fusion_decode_duration_seconds_count", route="/predict") == 2
        assert info["batching"]["inline_decode_under_load"] is under_load

    run(body())


def test_bf16_gives_the_same_answers_as_fp32_within_its_precision(tiny_package: Path) -> None:
    images = [picture(color=c, fmt="JPEG") for c in ((220, 40, 40), (40, 80, 220), (235, 200, 30))]
    texts = ["What colour is the object?", "图中有几个圆形？", "Is it large?"]

    async def answers(precision: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with serve(settings_for(tiny_package, precision=precision)) as served:
            responses = [await served.client.post("/embed", **form(i, t)) for i, t in zip(images, texts, strict=True)]
            responses += [
                await served.client.post("/predict", **form(i, t)) for i, t in zip(images, texts, strict=True)
            ]
            assert [r.status_code for r in responses] == [200] * 6
            return [r.json() for r in responses], (await served.client.get("/info")).json()

    async def body() -> None:
        (full, full_info), (half, half_info) = await answers("fp32"), await answers("bf16")
        assert (full_info["precision"], half_info["precision"]) == ("fp32", "bf16")
        assert (full_info["graph_optimized"], half_info["graph_optimized"]) == (True, False)  # fp32 only
        for exact, reduced in zip(full[:3], half[:3], strict=True):
            for name in ("image_embedding", "text_embedding"):
                np.testing.assert_allclose(reduced[name], exact[name], atol=2e-2)
                assert reduced[name] != exact[name]  # it did run at the reduced precision
        assert [a["label"] for a in half[3:]] == [a["label"] for a in full[3:]]

    run(body())


def test_embed_image_text_and_both(tiny_package: Path) -> None:
    image, text = picture(color=(40, 170, 60)), "Is there a green triangle?"
    expected = expected_outputs(tiny_package, image, text)

    async def body() -> None:
        async with serve(settings_for(tiny_package)) as served:
            image_only = (await served.client.post("/embed", **form(image))).json()
            text_only = (await served.client.post("/embed", **form(text=text))).json()
            both = (await served.client.post("/embed", **form(image, text))).json()
        assert set(image_only) == {"image_embedding", "dim", "model"}
        assert set(text_only) == {"text_embedding", "dim", "model"}
        assert set(both) == {"image_embedding", "text_embedding", "similarity", "dim", "model"}
        assert image_only["dim"] == len(image_only["image_embedding"]) == 16
        np.testing.assert_allclose(image_only["image_embedding"], expected["encode_image"].numpy(), atol=1e-5)
        np.testing.assert_allclose(text_only["text_embedding"], expected["encode_text"].numpy(), atol=1e-5)
        np.testing.assert_allclose(both["image_embedding"], expected["image_embedding"].numpy(), atol=1e-5)
        np.testing.assert_allclose(both["text_embedding"], expected["text_embedding"].numpy(), atol=1e-5)
        cosine = float(
            torch.nn.functional.cosine_similarity(expected["image_embedding"], expected["text_embedding"], dim=0)
        )
        assert both["similarity"] == pytest.approx(cosine, abs=1e-5)

    run(body())


def test_request_id_is_echoed_when_safe_and_replaced_otherwise(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            trace = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
            for sent in ("client-42.a:b", trace, "q+/Zm9v{1}==", "~" * 200):
                echoed = await served.client.get("/healthz", headers={"X-Request-ID": sent})
                assert echoed.headers["x-request-id"] == sent
            for unsafe in ("bad id\twith spaces", "with space", "~" * 201, "caf\u00e9"):
                replaced = await served.client.get("/healthz", headers={b"X-Request-ID": unsafe.encode("utf-8")})
                assert re.fullmatch("[0-9a-f]{32}", replaced.headers["x-request-id"]), unsafe
            error = await served.client.post("/predict", json={}, headers={"X-Request-ID": "abc"})
            assert assert_error(error, 415, "unsupported_media_type")["request_id"] == "abc"
            for response in (echoed, replaced, error):
                assert response.headers["x-model-version"] == "1.2.3-probe"

    run(body())


def test_every_status_of_the_error_table(probe_package: Path) -> None:
    """400, 413 (declared and streamed), 415 (both kinds), 422, 404, 405 and validation errors; the
    statuses that need load or a failing model (429, 500, 503, 504) are tested in test_batching."""
    good_image = picture()

    async def chunked(size: int) -> Any:
        for _ in range(size // 1024):
            yield b"x" * 1024

    async def body() -> None:
        async with serve(settings_for(probe_package, max_body_bytes=64 * 1024, max_image_bytes=32 * 1024)) as served:
            client = served.client
            multipart = {"Content-Type": "multipart/form-data; boundary=b"}
            assert_error(
                await client.post("/predict", content=b"--b\r\nnonsense", headers=multipart), 400, "malformed_request"
            )
            assert_error(
                await client.post("/predict", content=b"x", headers={**multipart, "Content-Length": "999999999"}),
                413,
                "payload_too_large",
            )
            assert_error(
                await client.post("/predict", content=chunked(70 * 1024), headers=multipart), 413, "payload_too_large"
            )
            assert_error(
                await client.post("/predict", **form(b"\x89PNG" + b"0" * 40 * 1024, "q")), 413, "image_too_large"
            )
            assert_error(await client.post("/predict", json={"text": "q"}), 415, "unsupported_media_type")
            assert_error(await client.post("/predict", data={"text": "q"}), 415, "unsupported_media_type")
            assert_error(await client.post("/predict", **form(picture(fmt="TIFF"), "q")), 415, "unsupported_format")
            assert_error(await client.post("/predict", **form(text="q")), 422, "missing_field")
            assert_error(await client.post("/predict", **form(good_image, "x" * 65)), 422, "text_too_long")
            assert_error(await client.post("/predict", **form(good_image, " ")), 422, "empty_text")
            assert_error(await client.post("/predict", **form(good_image[:50], "q")), 422, "corrupt_image")
            assert_error(await client.post("/predict", **form(picture(size=(300, 3)), "q")), 422, "image_dimensions")
            for timeout in (b"soon", b"0", b"\xb2", b"9" * 5000):  # b"\xb2": a superscript two
                headers = {b"X-Request-Timeout-Ms": timeout}
                assert_error(
                    await client.post("/predict", **form(good_image, "q"), headers=headers), 422, "invalid_timeout"
                )
            assert_error(await client.post("/embed", **form()), 422, "missing_field")
            # A form field in the URL would be ignored without a word: refused, before the body is read.
            in_url = await client.post("/predict?v=2&top_k=3&text=", **form(good_image, "q"))
            assert assert_error(in_url, 422, "invalid_field")["message"] == (
                "text, top_k: send form fields in the multipart body, not in the URL"
            )
            assert (await client.post("/predict?v=2", **form(good_image, "q"))).status_code == 200
            assert_error(await client.get("/nowhere"), 404, "not_found")
            not_allowed = await client.get("/predict")
            assert_error(not_allowed, 405, "method_not_allowed")
            assert not_allowed.headers["allow"] == "POST"
            # The service is untouched by all of that.
            assert (await client.post("/predict", **form(good_image, "q"))).status_code == 200
            samples = await served.metrics()
            assert metric(samples, "fusion_requests_total", route="/predict", status="422") == 10
            assert metric(samples, "fusion_requests_total", route="/embed", status="422") == 1
            assert metric(samples, "fusion_requests_total", route="unmatched", status="404") == 1

    run(body())


def test_framework_validation_errors_have_the_same_shape(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:

            @served.app.get("/typed")
            async def typed(count: int) -> dict[str, int]:
                return {"count": count}

            error = assert_error(await served.client.get("/typed", params={"count": "many"}), 422, "invalid_field")
            assert "count" in error["message"] and "many" not in error["message"]

    run(body())


def test_status_table_matches_the_design() -> None:
    assert sorted(STATUS.values()) == [400, 401, 408, 413, 415, 422, 429, 499, 500, 503, 504]


def test_the_call_cost_is_measured_at_startup_and_reported(tiny_package: Path) -> None:
    """The fitted cost of a call (finite, or infinite when the timings show no fixed or no per-token
    cost): /info, the gauge and the startup phases say the same."""

    async def body() -> None:
        async with serve(settings_for(tiny_package)) as served:
            info = (await served.client.get("/info")).json()
            samples = await served.metrics()
            costs = dict(served.state.engine.call_cost_tokens) if served.state.engine else {}
            phases = dict(served.state.startup_seconds)
        reported = info["batching"]["call_cost_tokens"]
        assert set(reported) == {"fuse", "text"}
        assert {kind for kind in costs if kind.needs_text} == {Kind.FUSE, Kind.TEXT}  # the loop below is not empty
        for kind, cost in costs.items():
            if kind.needs_text:
                assert cost > 0
                assert reported[kind.value] == (None if math.isinf(cost) else round(cost, 1))
                assert metric(samples, "fusion_call_cost_tokens", kind=kind.value) == cost
        assert Kind.IMAGE not in {kind for kind, cost in costs.items() if not math.isinf(cost)}
        assert list(phases)[:3] == ["load", "warmup", "callcost"] and phases["callcost"] > 0
        async with serve(settings_for(tiny_package, max_batch_size=1)) as served:
            unbatched = (await served.client.get("/info")).json()["batching"]["call_cost_tokens"]
        assert unbatched == {"fuse": None, "text": None}  # batches of one: nothing to split

    run(body())


def test_info_describes_model_device_and_batching(probe_package: Path) -> None:
    async def body() -> None:
        settings = settings_for(
            probe_package, max_wait_ms=2, lookahead_ms=1.5, max_queue=99, max_text_bytes=777, body_timeout_s=9.5
        )
        async with serve(settings) as served:
            info = (await served.client.get("/info")).json()
        manifest = json.loads((probe_package / "manifest.json").read_text())
        assert info["model"]["name"] == "probe" and info["model"]["version"] == "1.2.3-probe"
        assert info["model"]["sha256"] == manifest["archive_sha256"]
        assert info["model"]["labels"] == list(TEST_LABELS)
        assert info["model"]["image_size"] == [32, 32]
        assert info["device"] == "cpu" and info["threads"] == 1
        assert info["graph_optimized"] is True  # the default on the CPU at fp32
        assert info["batching"]["max_batch_size"] == 8
        assert info["batching"]["max_wait_ms"] == 2 and info["batching"]["lookahead_ms"] == 1.5
        assert info["batching"]["max_queue"] == 99
        assert info["batching"]["decode_workers"] == settings.decode_threads()
        assert info["limits"]["max_text_bytes"] == 777 and info["limits"]["body_timeout_s"] == 9.5
        assert info["limits"] == {name: getattr(settings, name) for name in info["limits"]}

    run(body())


def test_openapi_documents_fields_and_errors(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            schema = (await served.client.get("/openapi.json")).json()
        predict = schema["paths"]["/predict"]["post"]
        fields = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert set(fields["properties"]) == {"image", "text", "top_k"}
        assert fields["required"] == ["image", "text"]
        assert {"400", "413", "415", "422", "429", "500", "503", "504"} <= set(predict["responses"])
        assert {p["name"] for p in predict["parameters"]} == {"X-Request-Timeout-Ms", "X-Request-ID"}
        embed = schema["paths"]["/embed"]["post"]
        assert set(embed["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]) == {"image", "text"}
        for path in ("/healthz", "/readyz", "/info", "/metrics"):
            assert path in schema["paths"]
        described = schema["components"]["schemas"]["PredictResponse"]["properties"]
        assert all("description" in field or "$ref" in field for field in described.values())

    run(body())


def test_metrics_are_prometheus_text_with_startup_phases(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            await served.client.post("/predict", **form(picture(), "q"))
            response = await served.client.get("/metrics")
            assert response.headers["content-type"].startswith("text/plain")
            samples = await served.metrics()
        for phase in ("load", "warmup", "selfcheck", "total"):
            assert metric(samples, "fusion_startup_seconds", phase=phase) > 0
        assert metric(samples, "fusion_ready") == 1
        assert metric(samples, "fusion_requests_total", route="/predict", status="200") == 1
        assert metric(samples, "fusion_batch_size_count", kind="fuse") == 1
        assert metric(samples, "fusion_decode_duration_seconds_count", route="/predict") == 1
        assert metric(samples, "fusion_queue_wait_seconds_count", kind="fuse") == 1
        assert metric(samples, "fusion_request_duration_seconds_count", route="/predict") == 1
        assert metric(samples, "fusion_model_info", name="probe", version="1.2.3-probe", device="cpu") == 1

    run(body())


def test_not_ready_while_loading_then_ready(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package, retry_after_s=3), wait_ready=False) as served:
            ready = await served.client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
            assert ready.json()["reason"] in ("loading", "warming_up", "self_check")
            assert ready.headers["retry-after"] == "3"
            refused = await served.client.post("/predict", **form(picture(), "q"))
            assert_error(refused, 503, "not_ready")
            assert refused.headers["retry-after"] == "3"
            assert (await served.client.get("/healthz")).status_code == 200  # alive while loading
            await until(lambda: served.state.readiness() is None, timeout_s=30)
            assert (await served.client.get("/readyz")).json() == {"status": "ready"}
            assert (await served.client.post("/predict", **form(picture(), "q"))).status_code == 200

    run(body())


def test_failed_startup_is_never_ready(tmp_path: Path, probe_package: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in probe_package.rglob("*"):
        target = broken / item.relative_to(probe_package)
        if item.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.write_bytes(item.read_bytes())
    (broken / "model.pt").write_bytes((broken / "model.pt").read_bytes()[:-10] + b"0123456789")

    async def body() -> None:
        async with serve(settings_for(broken), wait_ready=False) as served:
            await until(lambda: served.state.failure is not None, timeout_s=30)
            ready = (await served.client.get("/readyz")).json()
            assert ready["status"] == "not_ready" and "sha256" in ready["reason"]
            health = await served.client.get("/healthz")
            assert health.status_code == 503 and health.json() == {"status": "dead", "reason": "startup failed"}
            assert_error(await served.client.post("/predict", **form(picture(), "q")), 503, "not_ready")

    run(body())


def test_liveness_turns_red_when_the_inference_thread_stops(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            worker = served.state.worker
            assert worker is not None
            worker.shutdown()
            health = await served.client.get("/healthz")
            assert health.status_code == 503
            assert health.json() == {"status": "dead", "reason": "the inference worker has stopped"}
            assert (await served.client.get("/readyz")).status_code == 503
            assert_error(await served.client.post("/predict", **form(picture(), "q")), 503, "not_ready")

    run(body())
