"""What a run's /metrics difference says: where a request's time went, and how full the batches were.

The service's histograms (app/metrics.py) time, per request: decoding (multipart parsing, image
decoding, tokenizing and validation in the decode pool, the wait for a pool thread included),
the wait in the batch queue, and, per batch, the device time. The rest of the end-to-end time is
HTTP, reading the body, the event loop's own scheduling and writing the response.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from bench.server import Sample, by_label, total

ROUTES = ("/predict", "/embed")


def stage_breakdown(delta: Mapping[Sample, float]) -> dict[str, float]:
    """Mean seconds per request of each stage over a run, plus the mean batch size."""
    requests = sum(total(delta, "fusion_request_duration_seconds_count", route=route) for route in ROUTES)
    if requests <= 0:
        return {}
    e2e = sum(total(delta, "fusion_request_duration_seconds_sum", route=route) for route in ROUTES) / requests
    decoded = total(delta, "fusion_decode_duration_seconds_count")
    decode = total(delta, "fusion_decode_duration_seconds_sum") / decoded if decoded else 0.0
    queued = total(delta, "fusion_queue_wait_seconds_count")
    queue = total(delta, "fusion_queue_wait_seconds_sum") / queued if queued else 0.0
    batches = by_label(delta, "fusion_batch_size_count", "kind")
    items = by_label(delta, "fusion_batch_size_sum", "kind")
    durations = by_label(delta, "fusion_batch_duration_seconds_sum", "kind")
    # An item waits for its whole batch: weight each lane's mean batch time by the items it ran.
    ran = sum(items.values())
    device = (
        sum(items[kind] * durations.get(kind, 0.0) / batches[kind] for kind in items if batches.get(kind)) / ran
        if ran
        else 0.0
    )
    return {
        "e2e_p99": histogram_quantile(delta, "fusion_request_duration_seconds", 0.99, ROUTES),
        "decode_p99": histogram_quantile(delta, "fusion_decode_duration_seconds", 0.99),
        "queue_p99": histogram_quantile(delta, "fusion_queue_wait_seconds", 0.99),
        "device_p99": histogram_quantile(delta, "fusion_batch_duration_seconds", 0.99),
        "e2e": e2e,
        "decode": decode,
        "queue": queue,
        "device": device,
        "other": max(0.0, e2e - decode - queue - device),
        "mean_batch": ran / sum(batches.values()) if sum(batches.values()) else math.nan,
        # Forward calls per batch (texts of similar length run together) and the padded share of the
        # text tokens those calls ran.
        "calls_per_batch": (
            texts(by_label(delta, "fusion_batch_calls_total", "kind")) / batched
            if (batched := texts(batches))
            else math.nan
        ),
        "padding_share": (
            total(delta, "fusion_batch_padding_tokens_total") / slots
            if (slots := total(delta, "fusion_batch_tokens_total"))
            else math.nan
        ),
        "requests": requests,
    }


def texts(by_kind: Mapping[str, float]) -> float:
    """The sum over the lanes that carry text (fuse, text): the only ones that split by length."""
    return sum(count for kind, count in by_kind.items() if kind != "image")


def batch_histogram(delta: Mapping[Sample, float]) -> dict[float, float]:
    """Batches per size bucket (le -> batches with previous le < size <= le), over all lanes."""
    cumulative: dict[float, float] = {}
    for (sample, series), value in delta.items():
        if sample == "fusion_batch_size_bucket":
            le = float(dict(series)["le"])
            cumulative[le] = cumulative.get(le, 0.0) + value
    result: dict[float, float] = {}
    previous = 0.0
    for le in sorted(cumulative):
        if math.isinf(le):
            continue
        result[le] = cumulative[le] - previous
        previous = cumulative[le]
    return result


def histogram_quantile(
    delta: Mapping[Sample, float], name: str, q: float, routes: tuple[str, ...] | None = None
) -> float:
    """Prometheus' histogram_quantile over all label sets (or the given routes): linear within a bucket."""
    cumulative: dict[float, float] = {}
    for (sample, series), value in delta.items():
        labels = dict(series)
        if sample == f"{name}_bucket" and (routes is None or labels.get("route") in routes):
            le = float(labels["le"])
            cumulative[le] = cumulative.get(le, 0.0) + value
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return math.nan
    rank = q * cumulative[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = cumulative[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bucket: its bound is all that is known
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return math.nan
