"""The shipped model, on a fresh ShapesQA test split made by the generator with its own seed
(never used in training): JPEG quality 75, canvases spread over 64..512 px. It is the CLI's split

    python -m trainer data shapesqa --out EVAL --test 2000 --seed 6753709 --format jpeg --jpeg-quality 75

so a failure here can be looked into with `python -m trainer eval` on the same records.

Two kinds of check. The package must perform as its manifest says (metrics.test, recorded by
`python -m trainer eval --record test` on another 2000-scene held-out split), and neither modality
alone may answer. And the target table, within 2 points: 2000 scenes hold about 570 relational
questions, one binomial standard error of about 1.1 points at 92% (the 400 scenes this split had
before held about 115: 2.5 points, more than the 2-point allowance it was checked against).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from model.package import load_package
from trainer.data import load_dataset
from trainer.evaluate import evaluate
from trainer.shapesqa import split_seed, write_split

SHIPPED = Path(__file__).resolve().parents[2] / "weights" / "shapesqa"
CLI_SEED = 6753709  # its test split's seed is 20261129, used for nothing else
SCENES = 2000
# The split is fixed by its seed, so its numbers do not vary from run to run; they differ from the
# recorded ones, on another 2000 scenes, by sampling alone. Three binomial standard errors of a group's
# size here bound that (a group of 300 questions at 85% is +-2.1 points per standard error).
STANDARD_ERRORS = 3.0


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    metrics: dict[str, Any] = load_package(SHIPPED).manifest.metrics["test"]
    return metrics


def tolerance(accuracy_percent: float, count: int) -> float:
    p = accuracy_percent / 100
    return STANDARD_ERRORS * 100 * math.sqrt(max(p * (1 - p), 0.01) / count)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    split = tmp_path_factory.mktemp("shipped-eval")
    seed = split_seed(CLI_SEED, "test")
    manifest_path = write_split(split, SCENES, seed, sizes=(64, 512), fmt="jpeg", jpeg_quality=75, workers=2)
    package = load_package(SHIPPED)
    manifest = package.manifest
    data = load_dataset(manifest_path, manifest.labels, manifest.image_size, manifest.max_text_length, workers=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = evaluate(package.module, data)
    finally:
        torch.set_num_threads(threads)
    counts = {"all": len(data.records), "relational": 0, "non_relational": 0, "lang/en": 0, "lang/zh": 0}
    for record in data.records:
        counts["relational" if record.qtype in ("nearest", "farthest") else "non_relational"] += 1
        counts[f"lang/{record.lang}"] += 1
    result["counts"] = counts
    return result


def test_the_shipped_package_is_the_shapesqa_model() -> None:
    manifest = load_package(SHIPPED).manifest
    assert (manifest.name, manifest.task) == ("shapesqa", "shapesqa")
    assert manifest.labels[:5] == ("yes", "no", "circle", "square", "triangle")
    assert len(manifest.labels) == 22
    assert (SHIPPED / "MODEL_CARD.md").is_file()
    assert (SHIPPED / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_matches_the_recorded_metrics(report: dict[str, Any], recorded: dict[str, Any]) -> None:
    for group in ("all", "non_relational", "relational", "lang/en", "lang/zh"):
        expected = recorded["accuracy"][group]
        bound = tolerance(expected, report["counts"][group])
        assert abs(report["accuracy"][group] - expected) <= bound, (group, report["accuracy"][group], expected, bound)


def test_retrieval_matches_the_recorded_metrics(report: dict[str, Any], recorded: dict[str, Any]) -> None:
    expected = recorded["retrieval"]["recall@1"]
    assert abs(report["retrieval"]["recall@1"] - expected) <= tolerance(expected, SCENES)


# This split's own numbers (the model card's table of fresh splits, and the ablations measured on
# it): a regression of a few questions shows here, long before it leaves the sampling bounds above.
# Two questions of slack per group, for another CPU's float rounding on a borderline answer.
THIS_SPLIT = {"all": 99.5, "non_relational": 99.93, "relational": 98.33, "lang/en": 99.29, "lang/zh": 99.71}
THIS_SPLIT_RECALL_AT_1 = 98.75
THIS_SPLIT_TEXT_ONLY, THIS_SPLIT_IMAGE_ONLY = 22.35, 7.7


def test_this_split_scores_what_it_scored_when_shipped(report: dict[str, Any]) -> None:
    for group, expected in THIS_SPLIT.items():
        slack = 100 * 2 / report["counts"][group]
        assert abs(report["accuracy"][group] - expected) <= slack, (group, report["accuracy"][group], expected)
    assert abs(report["retrieval"]["recall@1"] - THIS_SPLIT_RECALL_AT_1) <= 100 * 2 / SCENES
    for name, expected in (
        ("text_only_accuracy", THIS_SPLIT_TEXT_ONLY),
        ("image_only_accuracy", THIS_SPLIT_IMAGE_ONLY),
    ):
        assert abs(report[name] - expected) <= 100 * 2 / report["counts"]["all"], (name, report[name])


def test_the_answer_needs_both_modalities(report: dict[str, Any]) -> None:
    full = report["accuracy"]["all"]
    assert report["text_only_accuracy"] < full - 5
    assert report["image_only_accuracy"] < full - 5


def test_the_target_table(report: dict[str, Any]) -> None:
    accuracy = report["accuracy"]
    assert accuracy["all"] >= 97 - 2
    assert accuracy["non_relational"] >= 98 - 2
    assert accuracy["relational"] >= 92 - 2
    assert abs(accuracy["lang/en"] - accuracy["lang/zh"]) <= 2 + 2
    assert report["retrieval"]["recall@1"] >= 90 - 2
    assert report["text_only_accuracy"] <= 45 + 2
    assert report["image_only_accuracy"] <= 15 + 2
