"""Running one batch as a few forward calls of texts of similar length.

A batch's texts are padded to its longest, and the text encoder and the fusion pay for every padded
token. Real traffic mixes short questions with long ones (the benchmark's mix: 24 to 174 tokens,
median 45), so a batch of 32 padded to its longest spends most of its text work on padding. Splitting
the batch into runs of similar length saves that work but pays a fixed cost per extra call.

The model of a call's cost is linear, fitted per kind at startup (`fit_call_cost`):

    seconds(rows, longest) = fixed + per_row * rows + per_token * rows * longest

so the only number the split needs is `fixed / per_token`: one more call's cost in padded tokens.
`group_by_length` then picks the partition of the length-sorted rows into contiguous runs that
minimizes the sum over runs of (overhead + rows * longest), by dynamic programming (O(n^2), n the
batch size: well under a millisecond at n = 64 next to a forward pass of tens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Timing:
    """One measured call: `rows` texts padded to `longest` tokens took `seconds`."""

    rows: int
    longest: int
    seconds: float


def group_by_length(lengths: Sequence[int], overhead_tokens: float) -> list[list[int]]:
    """The batch's row indices in groups that run as one call each, shortest texts first.

    Minimizes sum(overhead_tokens + len(group) * longest(group)) over partitions of the rows sorted
    by length into contiguous runs (an optimal partition is always such runs: putting a shorter text
    with longer ones never costs more than leaving it with shorter ones). A batch that stays whole
    (always, with an infinite overhead) keeps its order.
    """
    count = len(lengths)
    if count <= 1 or math.isinf(overhead_tokens):
        return [list(range(count))]
    order = sorted(range(count), key=lengths.__getitem__)
    ordered = [lengths[row] for row in order]
    # best[j]: the least cost of the first j sorted rows; start[j]: where the last run of that begins.
    best = [0.0] + [math.inf] * count
    start = [0] * (count + 1)
    for stop in range(1, count + 1):
        longest = ordered[stop - 1]  # sorted: the run's last row is its longest
        for begin in range(stop):
            cost = best[begin] + overhead_tokens + (stop - begin) * longest
            if cost < best[stop]:
                best[stop], start[stop] = cost, begin
    runs: list[list[int]] = []
    stop = count
    while stop:
        runs.append(order[start[stop] : stop])
        stop = start[stop]
    runs.reverse()
    return runs if len(runs) > 1 else [list(range(count))]


def fit_call_cost(timings: Sequence[Timing]) -> float:
    """One more call's cost in padded tokens (`fixed / per_token`), by least squares on the timings.

    Without two batch sizes and two lengths among the timings the costs cannot be told apart, and
    a per-token cost that measures as nothing (a device that pays no more for longer texts) means
    splitting never helps: both give infinity. A fixed cost measured below zero (noise) counts as
    zero.
    """
    if len({t.rows for t in timings}) < 2 or len({t.longest for t in timings}) < 2:
        return math.inf
    rows = np.array([t.rows for t in timings], dtype=np.float64)
    tokens = rows * np.array([t.longest for t in timings], dtype=np.float64)
    design = np.stack([np.ones_like(rows), rows, tokens], axis=1)
    seconds = np.array([t.seconds for t in timings], dtype=np.float64)
    (fixed, _per_row, per_token), *_ = np.linalg.lstsq(design, seconds, rcond=None)
    if per_token <= 0:
        return math.inf
    return max(float(fixed), 0.0) / float(per_token)
