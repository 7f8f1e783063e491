"""The accuracy report: groups by question type, language, relational or not, and margin band."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.preprocess import tokenize
from trainer.data import Record, TensorDataset
from trainer.evaluate import RETRIEVAL_POOL, accuracy_report, margin_bucket, predict, retrieval_recall


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


class PairedEmbeddings:
    """Image i and caption i embed as one-hot(i mod 50): each caption's true image ties with one other."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(images[:, 0, 0, 0].long() % 50, 50).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot((tokens[:, 0] - 1) % 50, 50).float()

    def __call__(self, image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        raise AssertionError("retrieval uses the encoders only")


def test_retrieval_counts_a_tie_against_the_true_image() -> None:
    """Caption i scores its image and image i +- 50 the same: never first (recall@1 0), always in
    the top two (recall@5 100). Counting ties as wins, a collapsed model would score 100 on both."""
    count = RETRIEVAL_POOL
    images = torch.zeros(count, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(count, dtype=torch.uint8)
    data = TensorDataset(
        images=images,
        image_index=torch.arange(count),
        tokens=[tokenize("q", 8).ids] * count,
        captions=[np.array([i + 1], dtype=np.int64) for i in range(count)],
        labels=torch.zeros(count, dtype=torch.int64),
        records=[Record("x.png", "q", 0, "c", "all", "en") for _ in range(count)],
    )
    assert retrieval_recall(PairedEmbeddings(), data) == {"recall@1": 0.0, "recall@5": 100.0}


def test_predict_sends_the_batches_to_the_models_device() -> None:
    """Validation during training on a GPU: the data set stays in host memory, each batch goes to
    the model's device, the predictions come back to the host (checked here with the meta device)."""
    seen: list[tuple[str, str]] = []

    def model(images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append((images.device.type, tokens.device.type))
        return {"logits": torch.tensor([[0.0, 1.0]] * len(images))}

    count = 5
    data = TensorDataset(
        images=torch.zeros(1, 3, 4, 4, dtype=torch.uint8),
        image_index=torch.zeros(count, dtype=torch.int64),
        tokens=[tokenize("q", 8).ids] * count,
        captions=[None],
        labels=torch.zeros(count, dtype=torch.int64),
        records=[Record("x.png", "q", 0, None, "all", "en") for _ in range(count)],
    )
    predicted = predict(model, data, batch_size=2, device=torch.device("meta"))  # type: ignore[arg-type]
    assert seen == [("meta", "meta")] * 3
    assert predicted.device.type == "cpu" and predicted.tolist() == [1] * count
