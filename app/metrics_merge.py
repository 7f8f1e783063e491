"""One replica's /metrics from the expositions of its processes (`--frontends N`).

A scrape through the replica's port reaches whichever process accepted the connection, so every
process must answer for the whole replica: its counters and histograms are the sums over the
processes, or `rate()` would jump between processes' values. The device process's own families
come first and whole; the front-ends add their samples:

- counters, histograms and gauges are summed by name and labels (requests by route and status,
  latency, decode time, queue depth of requests still decoding, resident memory of the replica);
- the device's state is the device's alone (DEVICE_ONLY: readiness, liveness, startup, call costs,
  the admission limit, the model, the process's start time and fd limit);
- `_created` samples are the device's alone (a sum of timestamps is no time).

A front-end that exits leaves its counters behind (`retire`), so the sums never go backwards when
one restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

DEVICE_ONLY: Final = frozenset(
    {
        "fusion_ready",
        "fusion_alive",
        "fusion_startup_seconds",
        "fusion_call_cost_tokens",
        "fusion_admission_limit",
        "fusion_model_info",
        "fusion_consecutive_failed_batches",
        "process_start_time_seconds",
        "process_max_fds",
    }
)
_MONOTONIC: Final = frozenset({"counter", "histogram", "summary"})

Labels = tuple[tuple[str, str], ...]


class _Family:
    def __init__(self, name: str, documentation: str, typ: str) -> None:
        self.name, self.documentation, self.type = name, documentation, typ
        self.samples: dict[tuple[str, Labels], float] = {}

    def add(self, sample_name: str, labels: Labels, value: float) -> None:
        key = (sample_name, labels)
        self.samples[key] = self.samples.get(key, 0.0) + value

    def metric(self) -> Metric:
        metric = Metric(self.name, self.documentation, self.type)
        for (sample_name, labels), value in self.samples.items():
            metric.add_sample(sample_name, dict(labels), value)
        return metric


class _Families(Collector):
    def __init__(self, families: Iterable[_Family]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return (family.metric() for family in self.families)


def merge(device: str, frontends: Iterable[str]) -> bytes:
    """The exposition text of the sums (see the module's docstring), in the device's family order."""
    families: dict[str, _Family] = {}
    _add(families, device, first=True)
    for text in frontends:
        _add(families, text, first=False)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)


def monotonic_part(text: str) -> str:
    """The counters and histograms of one exposition (what a process leaves behind when it exits)."""
    families: dict[str, _Family] = {}
    _add(families, text, first=True, keep=lambda family: family.type in _MONOTONIC)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry).decode()


def _add(families: dict[str, _Family], text: str, *, first: bool, keep: Callable[[Metric], bool] | None = None) -> None:
    for parsed in text_string_to_metric_families(text):
        if not first and (parsed.name in DEVICE_ONLY or parsed.name.endswith("_created")):
            continue
        if keep is not None and not keep(parsed):
            continue
        family = families.get(parsed.name)
        if family is None:
            family = families[parsed.name] = _Family(parsed.name, parsed.documentation, parsed.type)
        for sample in parsed.samples:
            if not first and sample.name.endswith("_created"):
                continue
            family.add(sample.name, tuple(sorted(sample.labels.items())), sample.value)
