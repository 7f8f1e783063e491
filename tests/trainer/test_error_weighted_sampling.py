"""Draws steered to the question types that validation gets wrong."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.trainer.test_sampling import dataset
from trainer.data import TensorDataset
from trainer.params import parse_args
from trainer.sampling import ErrorWeightedSampler


def typed(counts: dict[str, int]) -> TensorDataset:
    """One record per image; the first counts['a'] records are of type 'a', and so on in order."""
    data = dataset([1] * sum(counts.values()))
    kinds = [qtype for qtype, n in counts.items() for _ in range(n)]
    by_row = {int(data.image_index[r]): r for r in range(len(data))}  # image i -> its record's row
    records = list(data.records)
    for image, qtype in enumerate(kinds):
        records[by_row[image]] = dataclasses.replace(records[by_row[image]], qtype=qtype)
    data.records = records
    return data


def draw_shares(sampler: ErrorWeightedSampler, data: TensorDataset, batches: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(1)
    seen = [data.records[r].qtype for _ in range(batches) for r in sampler(generator).tolist()]
    return {qtype: seen.count(qtype) / len(seen) for qtype in sampler.qtypes}


def test_before_any_evaluation_the_draws_follow_the_datas_own_mix() -> None:
    data = typed({"near": 100, "shape": 300})
    sampler = ErrorWeightedSampler(data, batch_size=200, share=0.5)
    assert sampler.shares() == {"near": 0.25, "shape": 0.75}
    shares = draw_shares(sampler, data, 100)
    assert shares["near"] == pytest.approx(0.25, abs=0.01)


def test_the_share_goes_to_types_in_proportion_to_their_error() -> None:
    data = typed({"near": 100, "far": 100, "shape": 200})
    sampler = ErrorWeightedSampler(data, batch_size=200, share=0.5)
    sampler.update({"near": 0.3, "far": 0.1, "shape": 0.0})
    # natural 0.25 / 0.25 / 0.5; by error 0.75 / 0.25 / 0: half of each
    assert sampler.shares() == pytest.approx({"far": 0.25, "near": 0.5, "shape": 0.25}, abs=1e-12)
    shares = draw_shares(sampler, data, 100)
    assert shares == pytest.approx({"far": 0.25, "near": 0.5, "shape": 0.25}, abs=0.015)


def test_no_error_anywhere_returns_to_the_datas_mix() -> None:
    data = typed({"near": 100, "shape": 300})
    sampler = ErrorWeightedSampler(data, batch_size=50, share=0.8)
    sampler.update({"near": 0.5, "shape": 0.0})
    assert sampler.shares() == pytest.approx({"near": 0.85, "shape": 0.15}, abs=1e-12)
    sampler.update({"near": 0.0, "shape": 0.0})
    assert sampler.shares() == {"near": 0.25, "shape": 0.75}


def test_a_type_validation_did_not_measure_counts_as_the_mean_error() -> None:
    data = typed({"near": 100, "far": 100, "shape": 200})
    sampler = ErrorWeightedSampler(data, batch_size=50, share=0.5)
    sampler.update({"near": 0.3, "far": 0.1})  # shape unmeasured: 0.2, not 0 (which would starve it)
    # by error 0.5 / 1/6 / 1/3
    assert sampler.shares() == pytest.approx({"far": 0.125 + 1 / 12, "near": 0.375, "shape": 0.25 + 1 / 6})
    before = sampler.shares()
    sampler.update({"other": 0.9})  # nothing this data has: no change
    assert sampler.shares() == before


def test_draws_are_records_of_the_chosen_types_and_reach_every_record() -> None:
    data = typed({"near": 20, "shape": 40})
    sampler = ErrorWeightedSampler(data, batch_size=64, share=0.9)
    sampler.update({"near": 1.0})
    generator = torch.Generator().manual_seed(4)
    seen: set[int] = set()
    for _ in range(50):
        rows = sampler(generator)
        assert len(rows) == 64 and 0 <= int(rows.min()) and int(rows.max()) < len(data)
        seen.update(rows.tolist())
    assert seen == set(range(len(data)))


def test_a_checkpoints_shares_are_restored_and_the_draws_repeat_for_a_seed() -> None:
    data = typed({"near": 30, "shape": 30})
    first = ErrorWeightedSampler(data, batch_size=16, share=0.5)
    first.update({"near": 0.37, "shape": 0.11})  # shares that do not round to a few decimals
    again = ErrorWeightedSampler(data, batch_size=16, share=0.5)
    assert again.restore(first.shares())
    assert again.shares() == first.shares()
    assert torch.equal(first(torch.Generator().manual_seed(2)), again(torch.Generator().manual_seed(2)))
    assert not again.restore({"other": 1.0})  # another data set's types: ignored
    assert again.shares() == first.shares()


def test_the_option_needs_single_question_draws_and_a_fraction() -> None:
    base = ["--data", "d", "--out", "o"]
    config = parse_args([*base, "--no-group-by-image", "--error-weighted-share", "0.5"])
    assert config.error_weighted_share == 0.5
    for wrong in (["--error-weighted-share", "0.5"], ["--no-group-by-image", "--error-weighted-share", "1"]):
        with pytest.raises(SystemExit):
            parse_args([*base, *wrong])
    with pytest.raises(ValueError):
        ErrorWeightedSampler(typed({"a": 1}), 4, share=1.0)
