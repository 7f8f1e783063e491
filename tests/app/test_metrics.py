"""The metrics' label lookups (app.metrics.Family): cached children, the same series as prometheus_client's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from app.metrics import Family, Metrics


def test_a_family_hands_out_prometheus_clients_own_child_once_per_label_values() -> None:
    family = Family(Counter("things", "Things", ["route", "status"], registry=CollectorRegistry()))
    first = family.labels("/predict", "200")
    assert first is family.labels("/predict", "200")
    assert first is family.metric.labels("/predict", "200")
    assert family.labels("/predict", "400") is not first


def test_counts_through_a_family_reach_the_exposition() -> None:
    metrics = Metrics(max_batch_size=8)
    for _ in range(3):
        metrics.requests.labels("/predict", "200").inc()
    metrics.requests.labels("/embed", "422").inc()
    metrics.batch_size.labels("fuse").observe(5)
    text = metrics.render().decode()
    assert 'fusion_requests_total{route="/predict",status="200"} 3.0' in text
    assert 'fusion_requests_total{route="/embed",status="422"} 1.0' in text
    assert 'fusion_batch_size_bucket{kind="fuse",le="4.0"} 0.0' in text
    assert 'fusion_batch_size_bucket{kind="fuse",le="8.0"} 1.0' in text
