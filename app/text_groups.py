"""Running one batch as a few forward calls of texts of similar length.

A batch's texts are padded to its longest, and the text encoder and the fusion pay for every padded
token. Real traffic mixes short questions with long ones (the benchmark's mix: 24 to 174 tokens,
median 45), so a batch of 32 padded to its longest spends most of its text work on padding. Splitting
the batch into runs of similar length saves that work but pays a fixed cost per extra call.

The model of a call's cost is linear, fitted per kind at startup (`fit_call_cost`):

    seconds(rows, longest) = fixed + per_row * rows + per_token * rows * longest

so the only number the split needs is `fixed / per_token`: one more call's cost in padded tokens.
`group_by_length` then picks the partition of the length-sorted rows into contiguous runs that
minimizes the sum over runs of (overhead + rows * longest), by dynamic programming over the batch's
distinct lengths (O(m^2), m of them: at most the batch size and the model's longest text; well under
a millisecond at m = 32, next to a forward pass of tens).
"""

from __future__ import annotations

import bisect
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
    with longer ones never costs more than leaving it with shorter ones), and rows of one length
    never part. A batch that stays whole (always, with an infinite overhead) keeps its order.
    """
    count = len(lengths)
    longest = max(lengths, default=0)
    # Splitting saves at most the batch's padding: when a call costs more, skip the search.
    if count <= 1 or count * longest - sum(lengths) <= overhead_tokens:
        return [list(range(count))]
    # The search runs over the distinct lengths (at most the model's longest text, whatever the
    # batch size): cuts fall only between them. rows_below[i]: rows shorter than distinct[i].
    distinct = sorted(set(lengths))
    rows_below = [0] * (len(distinct) + 1)
    at_length = {length: 0 for length in distinct}
    for length in lengths:
        at_length[length] += 1
    for i, length in enumerate(distinct):
        rows_below[i + 1] = rows_below[i] + at_length[length]
    # best[j]: the least cost of the rows of the j shortest lengths; start[j]: where its last run begins.
    best = [0.0] + [math.inf] * len(distinct)
    start = [0] * (len(distinct) + 1)
    for stop in range(1, len(distinct) + 1):
        for begin in range(stop):
            cost = best[begin] + overhead_tokens + (rows_below[stop] - rows_below[begin]) * distinct[stop - 1]
            if cost < best[stop]:
                best[stop], start[stop] = cost, begin
    cuts = []
    stop = len(distinct)
    while stop:
        cuts.append(distinct[start[stop]])  # the shortest length of each run
        stop = start[stop]
    if len(cuts) == 1:
        return [list(range(count))]
    bounds = sorted(cuts)
    groups: list[list[int]] = [[] for _ in bounds]
    for row in sorted(range(count), key=lengths.__getitem__):
        groups[bisect.bisect_right(bounds, lengths[row]) - 1].append(row)
    return groups


def fit_call_cost(timings: Sequence[Timing]) -> float:
    """One more call's cost in padded tokens (`fixed / per_token`), by least squares on the timings.

    Without two batch sizes and two lengths among the timings the costs cannot be told apart, and
    a per-token cost that measures as nothing (a device that pays no more for longer texts) means
    splitting never helps: both give infinity. So does a fixed cost that measures as nothing: every
    call costs something, so that is noise, and a split on it would run nearly one call per length.
    """
    if len({t.rows for t in timings}) < 2 or len({t.longest for t in timings}) < 2:
        return math.inf
    rows = np.array([t.rows for t in timings], dtype=np.float64)
    tokens = rows * np.array([t.longest for t in timings], dtype=np.float64)
    design = np.stack([np.ones_like(rows), rows, tokens], axis=1)
    seconds = np.array([t.seconds for t in timings], dtype=np.float64)
    (fixed, _per_row, per_token), *_ = np.linalg.lstsq(design, seconds, rcond=None)
    if per_token <= 0 or fixed <= 0:
        return math.inf
    return float(fixed) / float(per_token)
