"""In-process ceilings and per-stage costs: the same model, thread count and inputs, no HTTP.

- forward only, per batch lane (fuse = forward, image = encode_image, text = encode_text), at batch
  sizes 1..max, on batches built from the mix's own items, run as the service's engine runs them
  (texts grouped by length when that pays, each group padded to its longest, with the call cost
  measured as the service measures it at startup);
- preprocessing (the shared decode_image + tokenize) of every request in the mix;
- the measured serial pipeline, preprocessing plus forward, one thread, at batch 1 and at the best
  batch size: requests are taken from the rotation, preprocessed, collected per lane, and a lane
  runs when it holds a full batch. This is the ceiling the served throughput is compared with;
- each request's batch-1 cost, its preprocessing plus a forward pass on its own image and text:
  what the served latency at concurrency 1 is compared with. `recheck` measures the best batch's
  pipeline and the batch-1 cost again between served runs;
- the service's own per-request steps, timed one by one (multipart parsing, validation, decoding,
  staging, the engine's output handling, JSON): where a request's CPU time goes without HTTP.

Everything runs on the calling thread with `torch.set_num_threads(threads)`: the service runs
every forward pass on one inference thread with that many intra-op threads. The module is the one
the service serves: frozen and optimized for inference unless `--no-optimize-graph`
(app.graph_optimization).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from app.items import ByteArray
from app.text_groups import group_by_length
from bench.payloads import BOUNDARY, Payload
from model.manifest import Manifest
from model.package import ModelPackage, load_package
from model.preprocess import TokenIds, decode_image, pad_tokens, tokenize

KINDS = ("fuse", "image", "text")
# Candidate batch sizes whose first pipeline measurement came within this share of the fastest run
# once more before one is chosen: one run each drifts by more than the sizes differ (the mix's batch
# 28 once measured 486 items/s against 493 for 32, whose median over six was then 454).
CONTENDER_SHARE = 0.9
# And always at least this many of the fastest: a first run far ahead of the rest may be the machine's
# fast moment (the uniform workload's batch 16 once ran 625 items/s, then 429-455 five times, while
# batch 8, at 531, 85 % of it, was never measured again).
MIN_CONTENDERS = 3


@dataclass
class Prepared:
    payload: Payload
    image: ByteArray | None  # uint8 [3, H, W], contiguous
    tokens: TokenIds | None  # int64 [L]
    preprocess_s: float  # median over repeats of decode_image + tokenize


@dataclass
class Ceilings:
    threads: int
    batch_sizes: list[int]
    forward_s: dict[str, dict[int, float]]  # lane -> batch size -> median seconds per batch
    preprocess_mean_s: float
    preprocess_median_s: float
    preprocess_by_picture: dict[str, float]  # median seconds per picture kind
    shares: dict[str, float]  # lane -> fraction of requests
    best_batch: int  # the candidate batch size with the highest median measured pipeline rate
    predicted_per_item_s: dict[int, float]  # batch size -> preprocessing + share-weighted forward / B
    # Median over the mix of preprocessing + forward at batch 1, each request with its own input; with
    # rechecks (`recheck`), the median of their medians, and each measurement's own in `..._medians_s`.
    batch1_cost_median_s: float
    batch1_cost_mean_s: float
    batch1_cost_medians_s: list[float] = field(default_factory=list)
    # Each request once, in the rotation's order, preprocessing and forward together (`batch1_in_order`):
    # the median per request of each measurement, the first and one per recheck.
    batch1_in_order_medians_s: list[float] = field(default_factory=list)
    rechecks: int = 0  # measurements of the best batch's pipeline and the batch-1 cost between served runs
    pipeline_rate: dict[int, list[float]] = field(default_factory=dict)  # batch size -> items/s per repeat
    # The same runs' items per second of forward time alone (collation and the model's calls): the
    # device's own bound, which a service that preprocesses beside the forward pass can approach.
    forward_rate: dict[int, list[float]] = field(default_factory=dict)
    stages_s: dict[str, float] = field(default_factory=dict)  # the service's own steps, mean per request
    # Per text lane, one more forward call's cost in padded tokens, as the service measures it (a lane
    # absent here never splits).
    call_cost_tokens: dict[str, float] = field(default_factory=dict)
    # The candidates measured a second time, in turn, before the best was chosen (MIN_CONTENDERS and
    # CONTENDER_SHARE); empty when there was one candidate alone.
    contenders: list[int] = field(default_factory=list)
    contender_share: float = CONTENDER_SHARE
    min_contenders: int = MIN_CONTENDERS
    # Per recheck given a spread time (`recheck`), every call's seconds of `forward_spread`: the same
    # batch of best_batch requests, back to back.
    spread_calls_s: list[list[float]] = field(default_factory=list)

    def ceiling(self, batch: int) -> float:
        return statistics.median(self.pipeline_rate[batch])

    def record_pipeline(self, batch: int, rates: tuple[float, float]) -> None:
        """One `pipeline_rate` run at `batch`: its items/s in all and of its forward time alone."""
        rate, forward_rate = rates
        self.pipeline_rate.setdefault(batch, []).append(rate)
        self.forward_rate.setdefault(batch, []).append(forward_rate)

    def lane_call_costs(self) -> dict[str, float]:
        """Every lane's call cost, infinite (never split) for a lane left out of call_cost_tokens."""
        return {lane: self.call_cost_tokens.get(lane, math.inf) for lane in KINDS}


def load(model: Path, threads: int, optimize_graph: bool) -> tuple[ModelPackage, bool]:
    """The package, its module the one the service would serve; and whether that is the optimized one."""
    from app.graph_optimization import optimized_module

    torch.set_num_threads(threads)
    package = load_package(model, "cpu", check_golden=False)
    optimized = optimized_module(package) if optimize_graph else None
    return (package, False) if optimized is None else (replace(package, module=optimized), True)


def median_time(action: Callable[[], object], repeats: int) -> float:
    """Median seconds of `action`."""
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        action()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def prepare(payloads: Sequence[Payload], manifest: Manifest, repeats: int) -> list[Prepared]:
    prepared = []
    for payload in payloads:
        image, tokens = preprocess(payload, manifest)
        seconds = median_time(lambda payload=payload: preprocess(payload, manifest), repeats)  # type: ignore[misc]
        prepared.append(Prepared(payload, image, tokens, seconds))
    return prepared


def preprocess(payload: Payload, manifest: Manifest) -> tuple[ByteArray | None, TokenIds | None]:
    """One request's model inputs, as the service makes them: its image decoded, its text tokenized."""
    image = None if payload.image is None else np.ascontiguousarray(decode_image(payload.image, manifest.image_size))
    tokens = tokenize(payload.text, manifest.max_text_length).ids if payload.text is not None else None
    return image, tokens


def _batch_of_one(image: ByteArray | None, tokens: TokenIds | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One request's inputs as a batch of 1: images [1, 3, H, W], tokens [1, L] (L >= 1)."""
    return (
        _tensor(image[None]) if image is not None else None,
        _tensor(pad_tokens([tokens])) if tokens is not None else None,
    )


@torch.inference_mode()
def batch1_in_order(
    module: torch.jit.ScriptModule,
    payloads: Sequence[Payload],
    manifest: Manifest,
    call_costs: Mapping[str, float] | None = None,
) -> list[float]:
    """Each request's seconds at batch 1, once each, in the rotation's order (the order a lone
    client sends them): decode, tokenize and forward pass timed together, as the service runs them
    for one request. `batch1_costs` repeats each call back to back and keeps the median, which finds
    every cache and branch predictor trained on that very call; between two requests a server runs
    other code, and so does this. Measured here, on this machine: a scene's decode_image 0.34 ms back
    to back, 0.53 ms after 4 ms of other work."""

    def one(payload: Payload) -> None:
        images, texts = _batch_of_one(*preprocess(payload, manifest))
        run_lane(module, payload.kind, images, texts, (call_costs or {}).get(payload.kind, math.inf))

    for payload in payloads[:8]:  # the decoders' and the model's first calls here are not what a request pays
        one(payload)
    seconds = []
    for payload in payloads:
        began = time.perf_counter()
        one(payload)
        seconds.append(time.perf_counter() - began)
    return seconds


def _batch(items: Sequence[Prepared], size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    chosen = [items[i % len(items)] for i in range(size)]
    images = np.stack([p.image for p in chosen]) if chosen[0].image is not None else None  # type: ignore[misc]
    tokens = pad_tokens([p.tokens for p in chosen]) if chosen[0].tokens is not None else None  # type: ignore[misc]
    return _tensor(images), _tensor(tokens)


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return torch.from_numpy(array) if array is not None else None


def run_lane(
    module: torch.jit.ScriptModule,
    kind: str,
    images: torch.Tensor | None,
    tokens: torch.Tensor | None,
    call_cost_tokens: float = math.inf,
) -> None:
    """One batch of a lane; with a finite call cost, as the service's engine runs it: in groups of
    similar text length (app.text_groups), each padded to its own longest."""
    if tokens is None or math.isinf(call_cost_tokens):
        _call_lane(module, kind, images, tokens)
        return
    lengths = (tokens != 0).sum(dim=1)
    groups = group_by_length(lengths.tolist(), call_cost_tokens)
    if len(groups) == 1:
        _call_lane(module, kind, images, tokens)
        return
    for group in groups:
        index = torch.tensor(group)
        longest = max(int(lengths[index].max()), 1)
        _call_lane(module, kind, images[index] if images is not None else None, tokens[index, :longest])


def _call_lane(
    module: torch.jit.ScriptModule, kind: str, images: torch.Tensor | None, tokens: torch.Tensor | None
) -> None:
    if kind == "fuse":
        module(images, tokens)
    elif kind == "image":
        module.encode_image(images)
    else:
        module.encode_text(tokens)


def call_costs(package: ModelPackage, max_batch: int) -> dict[str, float]:
    """Each lane's call cost in padded tokens, measured as the service measures it at startup (the
    same lengths, rows and fit), so the ceilings split batches as the service does."""
    from app.engine import Engine
    from app.items import Kind
    from app.lifespan import call_cost_rows, warmup_text_lengths

    engine = Engine(package, optimize_graph=False)  # the package's module already is the served one
    lengths = warmup_text_lengths(package.manifest.max_text_length)
    rows = call_cost_rows(package.device, max_batch)
    costs = {kind.value: math.inf for kind in Kind}
    for kind in (kind for kind in Kind if kind.needs_text):
        costs[kind.value] = engine.measure_call_cost(kind, lengths, rows)
    return costs


@torch.inference_mode()
def forward_table(
    module: torch.jit.ScriptModule,
    prepared: Sequence[Prepared],
    sizes: Sequence[int],
    repeats: int,
    call_costs: Mapping[str, float] | None = None,
) -> dict[str, dict[int, float]]:
    """Median seconds per batch, per lane and batch size, on batches of the lane's first items."""
    table: dict[str, dict[int, float]] = {}
    for kind in KINDS:
        items = [p for p in prepared if p.payload.kind == kind]
        if not items:
            continue
        table[kind] = {}
        for size in sizes:
            images, tokens = _batch(items, size)
            cost = call_costs.get(kind, math.inf) if call_costs else math.inf
            for _ in range(2):  # first calls pay for graph optimization and allocator growth
                run_lane(module, kind, images, tokens, cost)
            call = partial(run_lane, module, kind, images, tokens, cost)
            table[kind][size] = median_time(call, repeats)
    return table


@torch.inference_mode()
def batch1_costs(
    module: torch.jit.ScriptModule,
    prepared: Sequence[Prepared],
    repeats: int,
    call_costs: Mapping[str, float] | None = None,
) -> list[float]:
    """Each request's own batch-1 cost: its preprocessing plus the median of `repeats` forward calls
    on its own image and text, back to back (a text's length sets what the text encoder and the
    fusion cost, so one item per lane would stand for every length). The concurrency-1 target's
    side is `batch1_in_order`; an idle thread's forward, measured here once per request after 2 ms
    asleep, came out 1.04x the back-to-back call when the two were interleaved call by call (a
    2 ms spin instead, 1.03x), so it is not measured any more."""
    costs = []
    for item in prepared:
        kind = item.payload.kind
        images, tokens = _batch_of_one(item.image, item.tokens)
        call = partial(run_lane, module, kind, images, tokens, (call_costs or {}).get(kind, math.inf))
        call()  # a text length's first call at this shape is not what a request pays
        costs.append(item.preprocess_s + median_time(call, repeats))
    return costs


def interpolate(table: dict[int, float], size: int) -> float:
    """Per-batch time at `size` from the measured sizes (linear between neighbours)."""
    if size in table:
        return table[size]
    known = sorted(table)
    lower = max((s for s in known if s < size), default=known[0])
    upper = min((s for s in known if s > size), default=known[-1])
    if lower == upper:
        return table[lower] * size / lower
    weight = (size - lower) / (upper - lower)
    return table[lower] + weight * (table[upper] - table[lower])


@torch.inference_mode()
def pipeline_rate(
    module: torch.jit.ScriptModule,
    payloads: Sequence[Payload],
    manifest: Manifest,
    batch: int,
    seconds: float,
    call_costs: Mapping[str, float] | None = None,
) -> tuple[float, float]:
    """Measured serial ceiling: preprocess each request, run a lane when it holds `batch` items.
    Items/s of the whole, and items/s of the forward time alone (collating and running the lanes)."""
    size, max_length = manifest.image_size, manifest.max_text_length
    lanes: dict[str, list[tuple[ByteArray | None, TokenIds | None]]] = {kind: [] for kind in KINDS}
    done = 0
    index = 0
    forward_s = 0.0
    began = time.perf_counter()
    # At least one pass over the whole rotation, so every picture size counts in its proportion.
    while index < len(payloads) or time.perf_counter() - began < seconds:
        payload = payloads[index % len(payloads)]
        index += 1
        image = decode_image(payload.image, size) if payload.image is not None else None
        tokens = tokenize(payload.text, max_length).ids if payload.text is not None else None
        lane = lanes[payload.kind]
        lane.append((image, tokens))
        if len(lane) == batch:
            started = time.perf_counter()
            images = np.stack([i for i, _ in lane]) if lane[0][0] is not None else None  # type: ignore[misc]
            texts = pad_tokens([t for _, t in lane]) if lane[0][1] is not None else None  # type: ignore[misc]
            cost = (call_costs or {}).get(payload.kind, math.inf)
            run_lane(module, payload.kind, _tensor(images), _tensor(texts), cost)
            forward_s += time.perf_counter() - started
            done += batch
            lane.clear()
    return done / (time.perf_counter() - began), done / forward_s


@torch.inference_mode()
def forward_spread(
    module: torch.jit.ScriptModule,
    prepared: Sequence[Prepared],
    batch: int,
    seconds: float,
    call_costs: Mapping[str, float] | None = None,
) -> list[float]:
    """Every call's seconds: one batch, the workload's first `batch` requests of its commonest lane,
    run as the service runs it, back to back for `seconds`. Its inputs never change, so what varies
    from call to call is the machine (a neighbour on the host, the clock): a served tail rides on
    that spread, whatever the server does."""
    kinds = [item.payload.kind for item in prepared]
    kind = max(KINDS, key=kinds.count)
    images, tokens = _batch([item for item in prepared if item.payload.kind == kind], batch)  # cycled to `batch`
    call = partial(run_lane, module, kind, images, tokens, (call_costs or {}).get(kind, math.inf))
    for _ in range(2):  # this shape's first calls are not the machine's spread
        call()
    calls = []
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        start = time.perf_counter()
        call()
        calls.append(time.perf_counter() - start)
    return calls


def measure(
    package: ModelPackage,
    prepared: Sequence[Prepared],
    *,
    threads: int,
    max_batch: int,
    repeats: int,
    pipeline_seconds: float,
    pipeline_repeats: int,
    all_sizes: bool,
    stages: bool = True,
) -> Ceilings:
    module = package.module
    manifest = package.manifest
    payloads = [item.payload for item in prepared]
    powers = sorted({1, max_batch, *(2**k for k in range(1, 11) if 2**k < max_batch)})
    sizes = list(range(1, max_batch + 1)) if all_sizes else powers
    costs = call_costs(package, max_batch)
    forward = forward_table(module, prepared, sizes, repeats, call_costs=costs)
    shares = {kind: sum(p.payload.kind == kind for p in prepared) / len(prepared) for kind in forward}
    pre_mean = statistics.fmean(p.preprocess_s for p in prepared)
    predicted = {
        size: pre_mean + sum(shares[kind] * interpolate(forward[kind], size) / size for kind in forward)
        for size in range(1, max_batch + 1)
    }
    best = min(predicted, key=predicted.__getitem__)
    batch1 = batch1_costs(module, prepared, repeats, call_costs=costs)
    pictures: dict[str, list[float]] = {}
    for p in prepared:
        if p.payload.image is not None:
            pictures.setdefault(p.payload.image_name, []).append(p.preprocess_s)
    ceilings = Ceilings(
        threads=threads,
        batch_sizes=sizes,
        forward_s=forward,
        preprocess_mean_s=pre_mean,
        preprocess_median_s=statistics.median(p.preprocess_s for p in prepared),
        preprocess_by_picture={name: statistics.median(values) for name, values in pictures.items()},
        shares=shares,
        best_batch=best,
        predicted_per_item_s=predicted,
        batch1_cost_median_s=statistics.median(batch1),
        batch1_cost_mean_s=statistics.fmean(batch1),
        batch1_cost_medians_s=[statistics.median(batch1)],
        batch1_in_order_medians_s=[statistics.median(batch1_in_order(module, payloads, manifest, costs))],
        call_cost_tokens={lane: cost for lane, cost in costs.items() if not math.isinf(cost)},
    )
    # The prediction's batches are fixed item sets (their text lengths decide the padding), so it
    # only proposes candidates: the measured pipeline, over the whole rotation, picks the best.
    candidates = sorted({best, *(size for size in (4, 8, 16, max_batch) if size <= max_batch)} - {1})
    rates = ceilings.pipeline_rate

    def run(batch: int) -> None:
        ceilings.record_pipeline(batch, pipeline_rate(module, payloads, manifest, batch, pipeline_seconds, costs))

    for batch in [1, *candidates]:
        run(batch)
    ceilings.contenders = contenders_of({size: rates[size][0] for size in candidates})
    for batch in ceilings.contenders:
        run(batch)
    measured_best = ceiling_batch({size: rates[size] for size in candidates}, ceilings.contenders) if candidates else 1
    ceilings.best_batch = measured_best
    for batch in sorted({1, measured_best}):
        while len(rates[batch]) < pipeline_repeats:
            run(batch)
    if stages:
        ceilings.stages_s = service_stages(package, payloads, measured_best, repeats)
    return ceilings


def contenders_of(
    first: Mapping[int, float], share: float = CONTENDER_SHARE, at_least: int = MIN_CONTENDERS
) -> list[int]:
    """The batch sizes to measure once more: those whose first rate came within `share` of the
    fastest, and the `at_least` fastest whatever their rates; none when there is only one size."""
    if len(first) < 2:
        return []
    fastest = max(first.values())
    leaders = sorted(first, key=lambda size: (-first[size], size))[:at_least]
    return sorted({*leaders, *(size for size, rate in first.items() if rate >= share * fastest)})


def best_by_median(rates: Mapping[int, Sequence[float]]) -> int:
    """The batch size with the highest median rate (the smaller size on a tie)."""
    return max(sorted(rates), key=lambda size: statistics.median(rates[size]))


def ceiling_batch(rates: Mapping[int, Sequence[float]], contenders: Sequence[int]) -> int:
    """The best median among the contenders, or among all candidates when there were none: a size
    measured once, early, must not win against the contenders' two runs on a machine slowing down."""
    return best_by_median({size: rates[size] for size in contenders} if contenders else rates)


def recheck(
    package: ModelPackage,
    prepared: Sequence[Prepared],
    ceilings: Ceilings,
    *,
    repeats: int,
    pipeline_seconds: float,
    spread_seconds: float = 0.0,
) -> None:
    """Measure the in-process sides of the targets once more, between served runs: the pipeline at
    the best batch size, and the batch-1 cost; with `spread_seconds`, the machine's spread too
    (`forward_spread`, in `spread_calls_s`). A machine whose speed drifts during a run (a
    neighbour on the host, a busy disk) then weighs on both sides of each ratio alike, rather than
    on whichever side ran at the slow moment. Each measurement is appended to its series
    (`pipeline_rate[best]`, `batch1_cost_medians_s`), one per repeat, in order: bench.report pairs
    each repeat with its own; the tables show the medians over all measurements. The in-order
    batch-1 cost is measured apart (`recheck_in_order`), just before each concurrency-1 run."""
    module, manifest = package.module, package.manifest
    costs = ceilings.lane_call_costs()
    payloads = [item.payload for item in prepared]
    best = ceilings.best_batch
    ceilings.record_pipeline(best, pipeline_rate(module, payloads, manifest, best, pipeline_seconds, costs))
    # The forward passes re-timed; each request's preprocessing time is the first measurement's.
    ceilings.batch1_cost_medians_s.append(statistics.median(batch1_costs(module, prepared, repeats, call_costs=costs)))
    ceilings.batch1_cost_median_s = statistics.median(ceilings.batch1_cost_medians_s)
    if spread_seconds > 0:
        ceilings.spread_calls_s.append(forward_spread(module, prepared, best, spread_seconds, costs))
    ceilings.rechecks += 1


def recheck_in_order(package: ModelPackage, prepared: Sequence[Prepared], ceilings: Ceilings) -> float:
    """The in-order batch-1 cost once more (`batch1_in_order`), appended to its series; its median.
    Run just before the served run at concurrency 1 it is paired with: the machine's speed swings
    by a third within seconds here, so a reference measured a run or two earlier is often measured
    at another speed."""
    costs = ceilings.lane_call_costs()
    payloads = [item.payload for item in prepared]
    median = statistics.median(batch1_in_order(package.module, payloads, package.manifest, costs))
    ceilings.batch1_in_order_medians_s.append(median)
    return median


def service_stages(package: ModelPackage, payloads: Sequence[Payload], batch: int, repeats: int) -> dict[str, float]:
    """Mean seconds per request of each step the service runs for it, outside HTTP, one at a time."""
    from app.config import Settings
    from app.decoding import Decoder
    from app.engine import Engine
    from app.forms import parse_form
    from app.items import Kind, Row
    from app.routes.common import json_response
    from app.routes.embed import embed_body
    from app.routes.predict import predict_body

    decoder = Decoder(Settings(), package.manifest)
    engine = Engine(package, optimize_graph=False)  # the package's module already is the served one
    boundary = BOUNDARY.encode()
    bodies = [payload.request().split(b"\r\n\r\n", 1)[1] for payload in payloads]

    def decode(payload: Payload, body: bytes) -> object:
        return (decoder.predict if payload.route == "/predict" else decoder.embed)(body, boundary)

    fields = decoder.predict_fields
    parse = statistics.fmean(
        median_time(lambda b=body: parse_form(b, boundary, fields, 8), repeats)  # type: ignore[misc]
        for body in bodies
    )
    decoded = [decode(p, b) for p, b in zip(payloads, bodies, strict=True)]
    whole = statistics.fmean(
        median_time(lambda p=p, b=b: decode(p, b), repeats)  # type: ignore[misc]
        for p, b in zip(payloads, bodies, strict=True)
    )

    # Staging: the batcher copies each decoded image and token row into a preallocated batch buffer.
    height, width = package.manifest.image_size
    images = np.zeros((batch, 3, height, width), dtype=np.uint8)
    tokens = np.zeros((batch, package.manifest.max_text_length), dtype=np.int64)

    def stage() -> None:
        for row, item in enumerate(decoded[:batch]):
            if item.image is not None:  # type: ignore[attr-defined]
                images[row % batch] = item.image  # type: ignore[attr-defined]
            if item.tokens is not None:  # type: ignore[attr-defined]
                length = len(item.tokens)  # type: ignore[attr-defined]
                tokens[row % batch, :length] = item.tokens  # type: ignore[attr-defined]
                tokens[row % batch, length:] = 0

    staging = median_time(stage, repeats) / min(batch, len(decoded))

    # The engine's whole batch call (forward + softmax + per-row results) against the bare forward.
    fuse_items = [d for d, p in zip(decoded, payloads, strict=True) if p.kind == "fuse"]
    chosen = [fuse_items[i % len(fuse_items)] for i in range(batch)]
    longest = max(len(d.tokens) for d in chosen)  # type: ignore[attr-defined]
    batch_images = np.stack([d.image for d in chosen])  # type: ignore[attr-defined]
    batch_tokens = np.zeros((batch, longest), dtype=np.int64)
    for row, d in enumerate(chosen):
        batch_tokens[row, : len(d.tokens)] = d.tokens  # type: ignore[attr-defined]
    engine.execute(Kind.FUSE, batch_images, batch_tokens)
    with torch.inference_mode():
        bare = median_time(
            lambda: package.module(torch.from_numpy(batch_images), torch.from_numpy(batch_tokens)), repeats
        )
    execute = median_time(lambda: engine.execute(Kind.FUSE, batch_images, batch_tokens), repeats)
    rows = engine.execute(Kind.FUSE, batch_images, batch_tokens)

    manifest = package.manifest

    def respond(payload: Payload, row: Row) -> bytes:
        # What the routes do with a result row: their own body builders, then the JSON encoding.
        if payload.route == "/predict":
            assert row.probs is not None
            body = predict_body(manifest, row.probs, 5)
        else:
            body = embed_body(manifest, row, payload.image is not None, payload.text is not None)
        return bytes(json_response(body).body)

    first = rows[0]
    assert isinstance(first, Row)
    serialize = statistics.fmean(
        median_time(lambda p=p: respond(p, first), repeats)  # type: ignore[misc]
        for p in payloads
    )
    return {
        "multipart parse": parse,
        "decode + tokenize + validate": max(0.0, whole - parse),
        "staging copy": staging,
        f"forward (per item, batch {batch})": bare / batch,
        "engine outputs to rows (per item)": max(0.0, (execute - bare) / batch),
        "response JSON": serialize,
    }
