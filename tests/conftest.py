"""Shared fixtures: small real model packages, exported once per session, and real image bytes."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from model.config import FusionConfig, ImageTowerConfig, TextTowerConfig
from model.export import export_random_package

# 22 labels like the shipped task, so responses have the same shape as production ones.
TEST_LABELS = tuple(
    "yes no circle square triangle red green blue yellow purple orange large small left right 0 1 2 3 4 5 6".split()
)


def in_ci() -> bool:
    """CI sets CI=true: there a test whose tool is missing fails, so CI can never pass by skipping."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_tool(name: str, path: str | None = None) -> str:
    """The tool's path; a skip naming it where it is not installed, a failure in CI."""
    found = shutil.which(name) or (shutil.which(name, path=path) if path else None)
    if found is None:
        reason = f"{name} is not installed (apt-get install {name})"
        if in_ci():
            pytest.fail(f"{reason}: CI must run the tests that need it, not skip them")
        pytest.skip(reason)
    return found


def tiny_config(kind: str = "transformer", film: bool = False) -> FusionConfig:
    """A real FusionModel, small enough that a forward pass costs about a millisecond."""
    return FusionConfig(
        image=ImageTowerConfig(size=(32, 32), widths=(8, 16, 16), context_layers=1),
        text=TextTowerConfig(kind=kind, max_length=64, layers=1, heads=2),  # type: ignore[arg-type]
        width=32,
        fusion_layers=1,
        film=film,
        fusion_heads=2,
        embed_dim=16,
        num_labels=len(TEST_LABELS),
    )


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package exported from a randomly initialized tiny model (transformer text encoder)."""
    out = tmp_path_factory.mktemp("packages") / "tiny"
    export_random_package(out, tiny_config(), TEST_LABELS, seed=0, name="tiny")
    return out


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No FUSION_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("FUSION_"):
            monkeypatch.delenv(name)
    yield


def png_bytes(color: tuple[int, int, int] = (220, 40, 40), size: tuple[int, int] = (48, 48)) -> bytes:
    picture = Image.new("RGB", size, (230, 230, 230))
    ImageDraw.Draw(picture).ellipse([8, 8, size[0] - 8, size[1] - 8], fill=color)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
