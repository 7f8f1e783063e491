"""Export is proven by parity: eager vs scripted vs saved-and-reloaded, for every method,
both text encoders, batch sizes 1 to 32 and text lengths 1 to the maximum."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from model import torchscript
from model.config import FusionConfig
from model.export import export_random_package, script_module
from model.fusion import FusionModel
from model.package import load_package
from tests.conftest import TEST_LABELS, tiny_config

BATCH_SIZES = (1, 2, 7, 32)
ATOL = 1e-5


def reload(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torchscript.save(module, buffer)
    buffer.seek(0)
    return torchscript.load(buffer)


def outputs(module: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        result = dict(module(images, tokens))
        result["encode_image"] = module.encode_image(images)  # type: ignore[operator]
        result["encode_text"] = module.encode_text(tokens)  # type: ignore[operator]
    return result


@pytest.mark.parametrize(("kind", "film"), [("transformer", False), ("lstm", False), ("transformer", True)])
def test_eager_scripted_reloaded_parity(kind: str, film: bool) -> None:
    torch.manual_seed(1)
    config = tiny_config(kind, film)
    eager = FusionModel(config).eval()
    scripted = script_module(eager)
    reloaded = reload(scripted)
    generator = torch.Generator().manual_seed(2)
    max_length = config.text.max_length
    for batch in BATCH_SIZES:
        for length in (1, 13, max_length):
            images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=generator)
            tokens = torch.randint(1, 257, (batch, length), generator=generator)
            tokens[0, length // 2 + 1 :] = 0  # one right-padded row per batch
            expected = outputs(eager, images, tokens)
            for name, candidate in (("scripted", scripted), ("reloaded", reloaded)):
                actual = outputs(candidate, images, tokens)
                for key, value in expected.items():
                    torch.testing.assert_close(
                        actual[key], value, atol=ATOL, rtol=ATOL, msg=f"{name} {key} b={batch} L={length}"
                    )


def test_default_config_scripts_and_round_trips(tmp_path: Path) -> None:
    """The shipped architecture itself (not only the tiny one) exports, reloads and self-checks."""
    manifest = export_random_package(tmp_path / "pkg", FusionConfig(), TEST_LABELS, seed=3)
    package = load_package(tmp_path / "pkg")
    assert package.manifest == manifest
    assert manifest.image_size == (64, 64)
    assert manifest.max_text_length == 192
    assert manifest.embedding_dim == 128
    assert len(manifest.golden) == 4


def test_config_round_trips_through_the_manifest(tiny_package: Path) -> None:
    package = load_package(tiny_package)
    assert FusionConfig.from_dict(package.manifest.model_config) == tiny_config()
