"""Batches of whole images: the sampler, the distinct-image batch, and the model run on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import FusionConfig, ImageTowerConfig, TextTowerConfig
from model.fusion import FusionModel
from model.preprocess import tokenize
from trainer.data import Record, TensorDataset
from trainer.params import parse_args
from trainer.sampling import ImageGroupedSampler, RecordSampler


def dataset(questions_per_image: list[int]) -> TensorDataset:
    """Image i is filled with the value i; record r asks 'q r' about its image and has label r."""
    image_index = torch.tensor([i for i, n in enumerate(questions_per_image) for _ in range(n)])
    # Interleave the records so that an image's records are not next to each other in the file.
    order = torch.randperm(len(image_index), generator=torch.Generator().manual_seed(0))
    image_index = image_index[order]
    count = len(image_index)
    images = torch.arange(len(questions_per_image), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 8, 8)
    return TensorDataset(
        images=images.contiguous(),
        image_index=image_index,
        tokens=[tokenize(f"q {r}", 16).ids for r in range(count)],
        captions=[None] * len(questions_per_image),
        labels=torch.arange(count),
        records=[Record(image=str(i), text=f"q {r}", label=r, caption=None, qtype="all", lang="all")
                 for r, i in enumerate(image_index.tolist())],
    )  # fmt: skip


def test_records_by_image_lists_each_images_rows() -> None:
    data = dataset([2, 0, 3])
    groups = data.records_by_image()
    assert [len(g) for g in groups] == [2, 0, 3]
    for image, group in enumerate(groups):
        assert data.image_index[group].tolist() == [image] * len(group)


def test_grouped_batches_hold_whole_images_and_exactly_the_batch_size() -> None:
    data = dataset([4] * 50 + [1] * 10)
    sampler = ImageGroupedSampler(data, batch_size=30)
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        rows = sampler(generator)
        assert len(rows) == 30
        # The rows come as one run per image drawn: every run but the last is all of its image's
        # records (an image drawn twice in a row makes a run of twice its records).
        groups = data.records_by_image()
        start = 0
        while start < 30:
            image = int(data.image_index[rows[start]])
            wanted = groups[image].tolist()
            run = rows[start : start + len(wanted)].tolist()
            assert run == wanted[: len(run)]
            assert len(run) == len(wanted) or start + len(run) == 30
            start += len(run)


def test_capped_draws_take_a_random_subset_of_each_image() -> None:
    data = dataset([4] * 50 + [1] * 10)
    groups = data.records_by_image()
    sampler = ImageGroupedSampler(data, batch_size=30, per_image=2)
    generator = torch.Generator().manual_seed(3)
    seen: set[int] = set()
    for _ in range(200):
        rows = sampler(generator)
        assert len(rows) == 30
        # One run per draw: two distinct records of a 4-question image, the one of a 1-question image.
        start = 0
        while start < 30:
            image = int(data.image_index[rows[start]])
            run = rows[start : start + min(2, len(groups[image]))].tolist()
            assert set(run) <= set(groups[image].tolist()) and len(set(run)) == len(run)
            start += len(run)
        seen.update(rows.tolist())
    assert seen == set(range(len(data)))  # a random subset each draw, not always the same two


def whole_image_batch(groups: list[torch.Tensor], batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The sampler as it was before the cap, written out: earlier runs' commands must still reproduce."""
    rows: list[torch.Tensor] = []
    filled = 0
    while filled < batch_size:
        for image in torch.randint(len(groups), (batch_size,), generator=generator).tolist():
            rows.append(groups[image])
            filled += len(groups[image])
            if filled >= batch_size:
                break
    return torch.cat(rows)[:batch_size]


def test_no_cap_draws_the_same_batches_as_before_the_cap_existed() -> None:
    data = dataset([4] * 20 + [2] * 5)
    sampler = ImageGroupedSampler(data, 16, per_image=0)
    first, again = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(10):
        assert torch.equal(sampler(first), whole_image_batch(data.records_by_image(), 16, again))


def test_the_cap_needs_image_batches_and_a_count() -> None:
    base = ["--data", "d", "--out", "o"]
    assert parse_args([*base, "--questions-per-image", "2"]).questions_per_image == 2
    for wrong in (["--questions-per-image", "2", "--no-group-by-image"], ["--questions-per-image", "-1"]):
        with pytest.raises(SystemExit):
            parse_args([*base, *wrong])


def test_samplers_repeat_for_the_same_seed() -> None:
    data = dataset([4] * 20)
    for kind in (ImageGroupedSampler, RecordSampler):
        first = kind(data, 16)(torch.Generator().manual_seed(9))
        again = kind(data, 16)(torch.Generator().manual_seed(9))
        assert torch.equal(first, again)


def test_distinct_batch_sends_each_image_once() -> None:
    data = dataset([2, 3, 1])
    rows = torch.cat(data.records_by_image())[[0, 1, 2, 3, 4, 5, 0]]  # image 0 asked about three times
    images, position, tokens, labels, ids = data.distinct_batch(rows)
    assert images[:, 0, 0, 0].tolist() == [0, 1, 2]
    assert ids.tolist() == [0, 0, 1, 1, 1, 2, 0]
    assert position.tolist() == [0, 0, 1, 1, 1, 2, 0]
    assert labels.tolist() == rows.tolist()
    assert tokens.shape[0] == 7


def test_answer_on_repeated_regions_equals_the_forward_on_repeated_images() -> None:
    torch.manual_seed(0)
    cfg = FusionConfig(
        image=ImageTowerConfig(size=(32, 32), widths=(8, 16, 16)),
        text=TextTowerConfig(max_length=32, layers=1),
        width=32,
        fusion_layers=1,
        embed_dim=16,
    )
    model = FusionModel(cfg).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    position = torch.tensor([2, 0, 0, 1, 2])
    tokens = torch.from_numpy(np.stack([tokenize(f"question {i}", 32).ids[:12] for i in range(5)]))
    with torch.no_grad():
        shared = model.answer(model.image_encoder(images)[position], tokens)
        repeated = model(images[position], tokens)
    for key in ("logits", "image_embedding", "text_embedding"):
        torch.testing.assert_close(shared[key], repeated[key], rtol=1e-5, atol=1e-5)
