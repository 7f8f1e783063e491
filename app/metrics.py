"""Prometheus metrics, in a registry of their own per app instance (tests build many apps).

Histograms answer the SLO questions directly (no recording rules): end-to-end latency per route,
then where the time went: decoding, waiting for the device, running the batch; and how full the
batches were. Counters say what was refused and why: shed (admission), expired (deadline),
cancelled (client gone).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.metrics import MetricWrapperBase

# Seconds; dense between 1 ms and 1 s where an online model's SLO lives.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    sizes = {1, max_batch_size}
    size = 2
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(float(s) for s in sorted(sizes))


M = TypeVar("M", bound=MetricWrapperBase)


class Family(Generic[M]):
    """A labelled metric whose children are looked up once for each set of label values.

    prometheus_client's `labels()` checks its arguments, turns them into strings and takes a lock on
    every call (2 us here), and a request made twelve such calls on the event loop; the child
    it returns is the same object every time. The children are kept here, in a dict read without a
    lock: two threads that race on a first lookup both ask prometheus_client, which hands both the
    same child."""

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Family(
            Counter("fusion_requests", "Answered requests by route and status", ["route", "status"], registry=r)
        )
        self.latency = Family(
            Histogram(
                "fusion_request_duration_seconds",
                "End-to-end time from the request's arrival to its last response byte",
                ["route"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.decode = Family(
            Histogram(
                "fusion_decode_duration_seconds",
                "Multipart parsing, image decoding, tokenizing and validation of one request",
                ["route"],
                buckets=FAST_BUCKETS,
                registry=r,
            )
        )
        self.decoded_on_loop = Family(
            Counter(
                "fusion_decoded_on_loop",
                "Requests decoded on the event loop (alone in the server, small body) rather than in the decode pool",
                ["route"],
                registry=r,
            )
        )
        self.body_memory = Gauge(
            "fusion_body_memory_bytes",
            "Bytes held now for request bodies not yet decoded, each counted twice (--body-memory-mb bounds it per"
            " process)",
            registry=r,
        )
        self.decode_memory = Gauge(
            "fusion_decode_memory_bytes",
            "Bytes the images decoding in the pool hold now, by estimate (--decode-memory-mb bounds it per process)",
            registry=r,
        )
        self.decode_memory_waits = Counter(
            "fusion_decode_memory_waits",
            "Images that waited for decode memory before decoding (the budget was held by others)",
            registry=r,
        )
        self.queue_wait = Family(
            Histogram(
                "fusion_queue_wait_seconds",
                "Time from joining the batch queue to starting on the device (observed when the batch returns)",
                ["kind"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.batch_duration = Family(
            Histogram(
                "fusion_batch_duration_seconds",
                "Device time of one batch, including per-item retries after a failure",
                ["kind"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.batch_size = Family(
            Histogram(
                "fusion_batch_size",
                "Items per batch run on the device",
                ["kind"],
                buckets=batch_size_buckets(max_batch_size),
                registry=r,
            )
        )
        self.queue_depth = Family(
            Gauge(
                "fusion_queue_depth",
                "Admitted requests not yet running: decoding, or waiting for the device",
                ["stage"],
                registry=r,
            )
        )
        self.shed = Family(
            Counter(
                "fusion_requests_shed",
                "Requests refused for load: at admission, or as their body arrives",
                ["reason"],
                registry=r,
            )
        )
        self.admission_limit = Family(
            Gauge(
                "fusion_admission_limit",
                "Requests the server lets in at once (admitted or running) of a deadline class (allowances,"
                " in ms), lowered while the class's answers come late",
                ["allowing_ms"],
                registry=r,
            )
        )
        self.expired = Family(
            Counter("fusion_requests_expired", "Requests whose deadline passed before they ran", ["stage"], registry=r)
        )
        self.cancelled = Family(
            Counter("fusion_requests_cancelled", "Requests dropped before they ran", ["reason"], registry=r)
        )
        self.within_deadline = Family(
            Counter(
                "fusion_requests_within_deadline",
                "Requests answered 200 before their deadline (goodput)",
                ["route"],
                registry=r,
            )
        )
        self.tokens = Family(
            Counter(
                "fusion_batch_tokens", "Token slots in forward calls run (rows x padded length)", ["kind"], registry=r
            )
        )
        self.padding = Family(
            Counter(
                "fusion_batch_padding_tokens",
                "Of those, padding (texts are padded to the longest in their forward call)",
                ["kind"],
                registry=r,
            )
        )
        self.call_cost = Family(
            Gauge(
                "fusion_call_cost_tokens",
                "One more forward call's cost in padded text tokens, which decides when a batch splits (+Inf: never)",
                ["kind"],
                registry=r,
            )
        )
        self.batch_calls = Family(
            Counter(
                "fusion_batch_calls",
                "Forward calls batches ran as (texts of similar length together; retries not counted)",
                ["kind"],
                registry=r,
            )
        )
        self.items_executed = Family(
            Counter("fusion_items_executed", "Items given to the model (retries included)", ["kind"], registry=r)
        )
        self.model_failures = Family(
            Counter(
                "fusion_model_failures", "Items answered 500 because the model failed on them", ["kind"], registry=r
            )
        )
        self.batch_failures = Family(
            Counter(
                "fusion_batch_failures",
                "Forward calls (a batch, or one of its length groups) that raised and were retried in halves",
                ["kind"],
                registry=r,
            )
        )
        self.out_of_memory = Family(
            Counter(
                "fusion_out_of_memory",
                "Forward passes that ran out of device memory (split and retried; 500 out_of_memory for an item alone)",
                ["kind"],
                registry=r,
            )
        )
        self.hung = Counter(
            "fusion_forward_timeouts",
            "Batches still running after forward_timeout_s: their requests failed, /healthz turned 503",
            registry=r,
        )
        self.failed_batches = Gauge(
            "fusion_consecutive_failed_batches", "Batches in a row in which no item got an answer", registry=r
        )
        self.startup = Family(
            Gauge(
                "fusion_startup_seconds",
                "Time to ready by phase (load, warmup, callcost, selfcheck, total)",
                ["phase"],
                registry=r,
            )
        )
        self.ready = Gauge("fusion_ready", "1 when /readyz answers 200", registry=r)
        self.alive = Gauge("fusion_alive", "1 when /healthz answers 200", registry=r)
        self.frontends = Gauge(
            "fusion_frontends_connected",
            "Front-end processes serving through the device process (--frontends N: N-1 when all are up)",
            registry=r,
        )
        self.handoff_items = Counter(
            "fusion_handoff_items", "Items front-end processes handed to this process's batcher", registry=r
        )
        self.frontend_restarts = Counter(
            "fusion_frontend_restarts", "Front-end processes started again after they exited unexpectedly", registry=r
        )
        # process_resident_memory_bytes and friends (Linux): a soak or an alert watches memory here.
        ProcessCollector(registry=r)
        self.model_info = Family(
            Gauge("fusion_model_info", "The served model (value 1)", ["name", "version", "device"], registry=r)
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
