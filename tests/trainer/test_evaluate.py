"""The accuracy report: groups by question type, language, relational or not, and margin band."""

from __future__ import annotations

import pytest
import torch

from model.preprocess import tokenize
from trainer.data import Record, TensorDataset
from trainer.evaluate import accuracy_report, margin_bucket


@pytest.mark.parametrize(
    ("margin", "band"),
    [
        (0.05, "0.05-0.08"),
        (0.0799, "0.05-0.08"),
        (0.08, "0.08-0.12"),
        (0.15, "0.12-0.20"),
        (0.2, "0.20+"),
        (0.9, "0.20+"),
    ],
)
def test_margin_bands(margin: float, band: str) -> None:
    assert margin_bucket(margin) == band


def test_accuracy_report_groups_exactly() -> None:
    # (qtype, lang, margin, answered right)
    cases = [
        ("nearest", "en", 0.06, False),
        ("nearest", "zh", 0.07, True),
        ("nearest", "en", 0.30, True),
        ("farthest", "zh", 0.10, True),
        ("shape", "en", None, True),
        ("count", "zh", None, False),
    ]
    records = [Record("x.png", "q", 0, None, qtype, lang, margin) for qtype, lang, margin, _ in cases]
    data = TensorDataset(
        images=torch.zeros(1, 3, 4, 4, dtype=torch.uint8),
        image_index=torch.zeros(len(cases), dtype=torch.int64),
        tokens=[tokenize("q", 8).ids] * len(cases),
        captions=[None],
        labels=torch.zeros(len(cases), dtype=torch.int64),
        records=records,
    )
    predicted = torch.tensor([0 if right else 1 for *_, right in cases])
    assert accuracy_report(data, predicted) == {
        "all": 66.67,
        "lang/en": 66.67,
        "lang/zh": 66.67,
        "non_relational": 50.0,
        "qtype/count": 0.0,
        "qtype/farthest": 100.0,
        "qtype/farthest/margin 0.08-0.12": 100.0,
        "qtype/nearest": 66.67,
        "qtype/nearest/margin 0.05-0.08": 50.0,
        "qtype/nearest/margin 0.20+": 100.0,
        "qtype/shape": 100.0,
        "relational": 75.0,
    }
