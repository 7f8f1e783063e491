"""POST /predict and /embed are answered ahead of FastAPI's router (app.direct_routes), the same
as through it: the router's dependency for them is made to fail, and they answer all the same."""

from __future__ import annotations

from pathlib import Path

from app.deps import get_serving
from app.errors import InvalidInput
from tests.app.conftest import form, metric, picture, run, serve, settings_for
from tests.app.test_api import assert_error


def _through_the_router() -> None:
    raise InvalidInput("answered through the router", code="through_router")


def test_inference_routes_skip_the_router_and_answer_as_it_did(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            served.app.dependency_overrides[get_serving] = _through_the_router
            client = served.client
            predicted = await client.post("/predict", **form(picture(), "what shape?", top_k="2"))
            assert predicted.status_code == 200, predicted.text
            assert len(predicted.json()["top_k"]) == 2
            assert predicted.headers["x-model-version"] == "1.2.3-probe"
            embedded = await client.post("/embed", **form(text="a red circle"))
            assert embedded.status_code == 200, embedded.text
            assert embedded.json()["dim"] == 16
            # A domain error in the same shape as from the router's exception handler.
            assert_error(await client.post("/predict", **form(text="q")), 422, "missing_field")
            assert_error(await client.post("/predict", data={"text": "q"}), 415, "unsupported_media_type")
            # Every other method on those paths is the router's, which answers with 405.
            not_allowed = await client.get("/embed")
            assert_error(not_allowed, 405, "method_not_allowed")
            assert not_allowed.headers["allow"] == "POST"
            samples = await served.metrics()
            assert metric(samples, "fusion_requests_total", route="/predict", status="200") == 1
            assert metric(samples, "fusion_requests_total", route="/predict", status="422") == 1
            assert metric(samples, "fusion_requests_total", route="/predict", status="415") == 1
            assert metric(samples, "fusion_requests_total", route="/embed", status="200") == 1
            assert metric(samples, "fusion_requests_total", route="/embed", status="405") == 1

    run(body())
