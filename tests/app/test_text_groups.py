"""Splitting a batch by text length: the partition is the cheapest there is, and the call cost is
fitted from timings."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.text_groups import Timing, fit_call_cost, group_by_length


def cost(lengths: Sequence[int], groups: Sequence[Sequence[int]], overhead: float) -> float:
    return sum(overhead + len(group) * max(lengths[row] for row in group) for group in groups)


def partitions(rows: list[int]) -> Iterator[list[list[int]]]:
    """Every partition of `rows` into non-empty groups."""
    if not rows:
        yield []
        return
    first, rest = rows[0], rows[1:]
    for smaller in partitions(rest):
        yield [[first], *smaller]
        for index in range(len(smaller)):
            yield [*smaller[:index], [first, *smaller[index]], *smaller[index + 1 :]]


def test_short_and_long_texts_split_in_two_shortest_first() -> None:
    lengths = [60, 3, 60, 3, 3, 60, 3, 60]
    # One call: 20 + 8 * 60 = 500; two: (20 + 4 * 3) + (20 + 4 * 60) = 292.
    assert group_by_length(lengths, 20) == [[1, 3, 4, 6], [0, 2, 5, 7]]


def test_a_costly_call_keeps_the_batch_whole_and_in_order() -> None:
    lengths = [60, 3, 60, 3, 3, 60, 3, 60]
    # Two calls save 8 * 60 - (4 * 3 + 4 * 60) = 228 padded tokens: not worth a call costing 300.
    assert group_by_length(lengths, 300) == [list(range(8))]
    assert group_by_length(lengths, math.inf) == [list(range(8))]
    assert group_by_length([7], 0) == [[0]] and group_by_length([], 5) == [[]]


def test_a_large_batch_splits_at_its_distinct_lengths_only() -> None:
    lengths = [1 + row % 192 for row in range(1024)]  # 192 distinct lengths, 5 or 6 rows each
    groups = group_by_length(lengths, 300)
    assert sorted(itertools.chain.from_iterable(groups)) == list(range(1024))
    spans = [(min(lengths[row] for row in group), max(lengths[row] for row in group)) for group in groups]
    assert all(low <= high < next_low for (low, high), (next_low, _) in itertools.pairwise(spans))
    assert cost(lengths, groups, 300) < cost(lengths, [list(range(1024))], 300)


def test_equal_lengths_never_split_even_for_free_calls() -> None:
    assert group_by_length([9, 9, 9], 0) == [[0, 1, 2]]


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=192), min_size=1, max_size=7),
    overhead=st.floats(min_value=0, max_value=400, allow_nan=False),
)
def test_the_split_is_the_cheapest_of_all_partitions(lengths: list[int], overhead: float) -> None:
    groups = group_by_length(lengths, overhead)
    assert sorted(itertools.chain.from_iterable(groups)) == list(range(len(lengths)))
    best = min(cost(lengths, partition, overhead) for partition in partitions(list(range(len(lengths)))))
    assert cost(lengths, groups, overhead) == pytest.approx(best)


def test_fit_recovers_the_fixed_cost_in_tokens() -> None:
    # seconds = 1 ms per call + 0.3 ms per row + 0.01 ms per padded token: a call costs 100 tokens.
    timings = [
        Timing(rows, longest, 1e-3 + 3e-4 * rows + 1e-5 * rows * longest) for rows in (1, 4) for longest in (8, 192)
    ]
    assert fit_call_cost(timings) == pytest.approx(100.0)


def test_fit_on_a_device_that_pays_nothing_per_token_never_splits() -> None:
    timings = [Timing(rows, longest, 2e-3 + 1e-4 * rows) for rows in (1, 4) for longest in (8, 192)]
    assert fit_call_cost(timings) == math.inf


def test_fit_of_a_call_that_costs_nothing_fixed_never_splits() -> None:
    """A fixed cost measured at or below zero is noise: splitting on it would run a call per length."""
    timings = [Timing(rows, longest, -1e-4 + 1e-5 * rows * longest) for rows in (1, 4) for longest in (8, 192)]
    assert fit_call_cost(timings) == math.inf


def test_fit_without_two_batch_sizes_or_two_lengths_never_splits() -> None:
    one_size = [Timing(1, longest, 1e-3 + 1e-5 * longest) for longest in (8, 192)]
    one_length = [Timing(rows, 8, 1e-3 + 1e-4 * rows) for rows in (1, 4)]
    assert fit_call_cost(one_size) == fit_call_cost(one_length) == math.inf
