"""Access: optional API keys, the docs switch, and a route table that is exactly the documented one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from pydantic import ValidationError
from pydantic_settings import CliApp
from starlette.routing import Route

from app.auth import ApiKeyError, load_api_keys, presented_keys
from app.config import Settings
from app.main import create_app
from tests.app.conftest import form, metric, picture, run, serve, settings_for

KEY, OTHER = "k" * 16 + "-first-key", "second.key-0123456789"


def assert_unauthorized(response: httpx.Response, code: str, challenge: str) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]
    assert response.headers["www-authenticate"] == challenge
    assert KEY not in response.text and OTHER not in response.text


def test_with_keys_every_path_but_the_health_checks_needs_one(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package, api_keys=[KEY, OTHER])) as served:
            client = served.client
            realm = 'Bearer realm="fusionserve"'
            for path in ("/info", "/metrics", "/openapi.json", "/docs", "/nowhere"):
                assert_unauthorized(await client.get(path), "unauthorized", realm)
            # Refused before anything else: no 413 for the declared size, no 415 for the type.
            refused = await client.post("/predict", content=b"x", headers={"Content-Length": "999999999"})
            assert_unauthorized(refused, "unauthorized", realm)
            invalid = realm + ', error="invalid_token"'
            for headers in (
                {"Authorization": f"Bearer {KEY}x"},
                {"Authorization": f"Bearer {KEY[:-1]}"},
                {"X-API-Key": "wrong-key-but-long-enough"},
                {"Authorization": "Bearer " + KEY.upper()},
            ):
                assert_unauthorized(await client.get("/info", headers=headers), "invalid_api_key", invalid)
            basic = await client.get("/info", headers={"Authorization": f"Basic {KEY}"})  # not a Bearer credential
            assert_unauthorized(basic, "unauthorized", realm)
            for headers in (
                {"Authorization": f"Bearer {KEY}"},
                {"Authorization": f"bearer {OTHER}"},
                {"X-API-Key": KEY},
                {"X-API-Key": "wrong-key-but-long-enough", "Authorization": f"Bearer {OTHER}"},
            ):
                assert (await client.get("/info", headers=headers)).status_code == 200
            answer = await client.post("/predict", **form(picture(), "q"), headers={"X-API-Key": OTHER})
            assert answer.status_code == 200
            for path in ("/healthz", "/readyz"):
                assert (await client.get(path)).status_code == 200

    run(body())


def test_metrics_can_be_left_open_to_a_scraper(probe_package: Path) -> None:
    async def body() -> None:
        settings = settings_for(probe_package, api_keys=[KEY], metrics_require_key=False)
        async with serve(settings) as served:
            assert (await served.client.get("/info")).status_code == 401
            samples = await served.metrics()
        # Refusals are counted like any answer (the request context wraps the key check).
        assert metric(samples, "fusion_requests_total", route="unmatched", status="401") == 1

    run(body())


def test_without_keys_access_is_open(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            assert (await served.client.get("/info")).status_code == 200
            assert (await served.client.get("/info", headers={"Authorization": "Bearer anything"})).status_code == 200

    run(body())


def test_keys_from_a_file_the_environment_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# rotated 2026-01\n{KEY}\n\n  {OTHER}  \n")
    assert load_api_keys(Settings(api_keys_file=keys)) == [KEY, OTHER]
    monkeypatch.setenv("FUSION_API_KEYS", f"{KEY}, {OTHER}")
    assert load_api_keys(Settings()) == [KEY, OTHER]
    assert load_api_keys(CliApp.run(Settings, cli_args=["--api-keys", OTHER])) == [OTHER]
    assert KEY not in repr(Settings()) and KEY not in str(Settings().model_dump())  # secrets stay out of logs


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("# only a comment\n", "holds no key"),
        ("short\n", "API key 1 is not usable"),
        ("has a space in it, and is long\n", "API key 1 is not usable"),
        ("schlüssel-mit-umlaut-0123\n", "API key 1 is not usable"),
    ],
)
def test_unusable_key_files_are_refused_without_showing_the_key(tmp_path: Path, content: str, message: str) -> None:
    keys = tmp_path / "keys"
    keys.write_text(content)
    with pytest.raises(ApiKeyError) as refused:
        load_api_keys(Settings(api_keys_file=keys))
    assert message in str(refused.value) and content.strip() not in str(refused.value)


def test_presented_keys() -> None:
    assert presented_keys([(b"authorization", b"Bearer  abc "), (b"x-api-key", b"def")]) == [b"abc", b"def"]
    assert presented_keys([(b"authorization", b"Basic abc"), (b"x-api-key", b" ")]) == []


def test_docs_can_be_switched_off(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package, docs=False)) as served:
            for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
                assert (await served.client.get(path)).status_code == 404
            assert (await served.client.get("/info")).status_code == 200

    run(body())


def leaves(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every endpoint, through included routers (FastAPI keeps an included router
    as one entry, `_IncludedRouter`, with its prefix in `include_context`; older versions copied
    the routes up)."""
    for route in routes:
        if isinstance(route, APIRoute | Route):
            yield from ((method, prefix + route.path) for method in route.methods or ())
        elif hasattr(route, "original_router"):
            yield from leaves(route.original_router.routes, prefix + route.include_context.prefix)
        else:
            raise AssertionError(f"an endpoint of an unexpected kind: {route!r}")


def route_table(docs: bool) -> set[tuple[str, str]]:
    return set(leaves(create_app(Settings(docs=docs)).router.routes))


API = {
    ("POST", "/predict"),
    ("POST", "/embed"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/info"),
    ("GET", "/metrics"),
}
DOCS = {
    (method, path)
    for path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
    for method in ("GET", "HEAD")
}


def test_the_route_table_is_exactly_the_documented_one() -> None:
    """No endpoint loads a model, fetches a URL or reaches the file system: the six of the API
    (README, "HTTP API") and, when switched on, the docs."""
    assert route_table(docs=False) == API
    assert route_table(docs=True) == API | DOCS


def test_invalid_access_settings() -> None:
    with pytest.raises(ValidationError):
        Settings(docs="sometimes")  # type: ignore[arg-type]
