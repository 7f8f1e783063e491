"""The module frozen and optimized for inference (app.graph_optimization): what it changes in the
graph, that it answers as the module as loaded does, and that a module the passes refuse serves as
loaded."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from app import graph_optimization
from app.engine import Engine
from app.graph_optimization import largest_difference, optimized_module
from app.items import Kind, Row
from model.export import export_random_package
from model.package import GOLDEN_ATOL, load_package
from tests.app.conftest import export_test_model
from tests.app.keyed_head_model import KeyedHeadModel
from tests.conftest import TEST_LABELS, tiny_config


def test_the_optimized_graph_folds_batch_norms_and_answers_as_the_module_as_loaded(tiny_package: Path) -> None:
    package = load_package(tiny_package)
    optimized = optimized_module(package)
    assert optimized is not None
    before, after = str(package.module.encode_image.inlined_graph), str(optimized.encode_image.graph)
    assert before.count("aten::batch_norm") > 0 and after.count("aten::batch_norm") == 0  # folded
    assert before.count("aten::conv2d") == after.count("prim::mkldnn_convolution") == 7  # on oneDNN
    assert largest_difference(package, optimized) <= GOLDEN_ATOL

    served, as_loaded = Engine(package), Engine(package, optimize_graph=False)
    assert (served.graph_optimized, as_loaded.graph_optimized) == (True, False)
    generator = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=generator).numpy()
    tokens = torch.randint(2, 120, (5, 12), dtype=torch.int64, generator=generator).numpy()
    for kind in Kind:
        answers = served.execute(kind, images, tokens), as_loaded.execute(kind, images, tokens)
        for fast, slow in zip(*answers, strict=True):
            assert isinstance(fast, Row) and isinstance(slow, Row)
            for name in ("probs", "image_embedding", "text_embedding"):
                if getattr(slow, name) is not None:
                    np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), atol=1e-4)


def test_a_module_from_another_package_is_told_apart(tiny_package: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    export_random_package(other, tiny_config(), TEST_LABELS, seed=1, name="other")
    package = load_package(tiny_package)
    assert largest_difference(package, package.module) == 0.0
    assert largest_difference(package, load_package(other).module) > GOLDEN_ATOL


class OffAtBatch(torch.nn.Module):
    """Answers as `inner` does, except for a batch of `size`, whose image embedding is off by
    `offset`: what a rewrite whose kernel is wrong at one shape only would do."""

    def __init__(self, inner: torch.jit.ScriptModule, size: int, offset: float = 0.125) -> None:
        super().__init__()
        self.inner = inner
        self.size = size
        self.offset = offset

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = self.inner(images, tokens)
        if images.size(0) == self.size:
            outputs["image_embedding"] = outputs["image_embedding"] + self.offset
        return outputs

    @torch.jit.export
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_image(images)  # type: ignore[no-any-return]

    @torch.jit.export
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_text(tokens)  # type: ignore[no-any-return]


def test_a_module_wrong_at_batch_one_only_is_told_apart(tiny_package: Path) -> None:
    package = load_package(tiny_package)
    assert len(package.manifest.golden) > 1  # the golden batch itself is not a batch of one
    wrong_alone = torch.jit.script(OffAtBatch(package.module, size=1))
    assert largest_difference(package, wrong_alone) == pytest.approx(0.125, abs=1e-6)
    # A NaN in an output after the first (the logits) is the largest difference of all.
    not_a_number = torch.jit.script(OffAtBatch(package.module, size=1, offset=math.nan))
    assert largest_difference(package, not_a_number) == math.inf


@pytest.mark.parametrize(("offset", "told"), [(0.125, "0.125"), (math.nan, "inf")])
def test_a_rewrite_wrong_at_one_warm_up_batch_size_is_dropped_at_warm_up(
    offset: float, told: str, tiny_package: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    package = load_package(tiny_package)
    assert len(package.manifest.golden) != 2  # the startup check never runs a batch of two
    wrong_at_two = torch.jit.script(OffAtBatch(package.module, size=2, offset=offset))
    assert largest_difference(package, wrong_at_two) == 0.0
    monkeypatch.setattr(graph_optimization, "optimized_module", lambda _: wrong_at_two)
    engine = Engine(package)
    optimized_before_warm_up = engine.graph_optimized
    plan = engine.warm_up_plan(list(Kind), 8, [8, 16])
    assert [step.size for step in plan if step.kind is Kind.FUSE] == [1, 1, 2, 4, 8, 8]
    with caplog.at_level(logging.WARNING, logger="app.engine"):
        for step in plan:
            engine.warm_up(step)
    assert caplog.messages == [
        "serving the module as loaded: its optimized graph differs in fuse at batch 2, texts of 16 tokens"
        f" by {told} (more than 0.002)"
    ]
    assert (optimized_before_warm_up, engine.graph_optimized) == (True, False)
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=generator)
    tokens = torch.randint(2, 120, (2, 12), dtype=torch.int64, generator=generator)
    rows = engine.execute(Kind.FUSE, images.numpy(), tokens.numpy())
    with torch.inference_mode():
        expected = package.module(images, tokens)["image_embedding"].numpy()
    served = [row.image_embedding for row in rows if isinstance(row, Row) and row.image_embedding is not None]
    assert len(served) == len(rows)
    np.testing.assert_array_equal(np.stack(served), expected)  # the module as loaded answered


def test_a_module_that_freezing_refuses_serves_as_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    package = load_package(export_test_model(KeyedHeadModel(len(TEST_LABELS)), tmp_path / "keyed", "keyed", "1.0.0"))
    with caplog.at_level(logging.WARNING, logger="app.graph_optimization"):
        engine = Engine(package)
    assert engine.graph_optimized is False
    assert caplog.messages == [
        "serving the module as loaded: optimizing its graph failed"
        " (RuntimeError: Freezing modules containing prim::ModuleContainerIndex is not supported)"
    ]
    engine.self_check()  # it serves, and serves the golden answers
