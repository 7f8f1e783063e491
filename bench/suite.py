"""The benchmark suite: `make bench`, or `python -m bench.suite [--model DIR] [--budget-s S]`.

One run, everything side by side, on one model package (default: weights/shapesqa, else a randomly
initialized package of the default FusionConfig, which costs the same as a trained one):

1. in-process ceilings, no HTTP, same model and thread count as the service (bench.inprocess), for
   both workloads: the realistic mix and the uniform one (/predict, ShapesQA scenes only);
2. two services start (time to ready recorded): batching on (the settings given) and batching off
   (`--max-batch-size 1`, otherwise the same); GET /healthz gives the framework's floor;
3. closed loop at each concurrency, on both services with the mix and on the batched one with the
   uniform workload, interleaved (batched c=1, unbatched c=1, uniform c=1, batched c=8, ...),
   repeated; medians over the repeats. wrk posts the pre-built requests when it is installed, else
   the raw-socket generator (bench.loadgen) does. Before each repeat, with the services idle, the
   best batch size's pipeline and the batch-1 cost are measured again in-process (about 10 s), with
   the machine's spread (one unchanged batch back to back, 2.5 s); the in-order batch-1 cost just
   before each batched concurrency-1 run (about 1 s); the targets compare each repeat's served
   figures with them (bench.report: medians of the per-repeat ratios);
4. open loop on the batched service: Poisson arrivals at fractions of the measured saturation
   throughput, latency from the intended send time;
5. resident memory of the batched service over 20,000 requests, one in four of them bad;
6. four more starts of the batched service, for the median time to ready over five;
7. bench/results/: report.md, results.json, PNG plots, the services' logs.

`--budget-s` sizes every phase (the fixed costs, starting services and building payloads, come on
top); at the default the whole run takes under 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import inprocess, loadgen
from bench.analysis import batch_histogram, stage_breakdown
from bench.loadgen import Latencies
from bench.payloads import (
    MixSpec,
    Payload,
    build_mix,
    build_pictures,
    describe,
    memory_rotation,
    with_deadline,
    write_requests,
)
from bench.server import ROOT, Server, diff, machine_busy_s, start_server, total
from bench.wrk import run_wrk, wrk_path, wrk_version
from model.manifest import read_manifest

if TYPE_CHECKING:
    from model.package import ModelPackage  # imports torch: the suite imports it when it measures

DEFAULT_BUDGET_S = 420.0
DEFAULT_CONCURRENCY = (1, 8, 32, 64)
# Overload with deadlines: the uniform workload at twice its saturation, every request allowing
# 100 ms. What counts there is the answers within their deadlines (an answer after its deadline is
# work lost), and how early the rest is refused.
OVERLOAD_SHARE = 2.0
OVERLOAD_DEADLINE_MS = 100
OPEN_FRACTIONS = (0.25, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.3)


def scenes_concurrencies(concurrencies: Sequence[int]) -> list[int]:
    """Where the uniform workload runs: the lowest and highest concurrency, and 32 (the targets')."""
    return sorted({min(concurrencies), max(concurrencies), 32} & set(concurrencies))


@dataclass
class Plan:
    budget_s: float
    concurrencies: list[int]
    repeats: int
    run_s: float
    warm_s: float
    open_fractions: list[float]
    open_s: float
    drain_s: float
    memory_requests: int
    memory_cap_s: float
    memory_concurrency: int
    inprocess_repeats: int
    pipeline_s: float
    pipeline_repeats: int
    all_sizes: bool
    extra_starts: int
    spread_s: float  # the machine's spread (inprocess.forward_spread), before each repeat

    @classmethod
    def for_budget(
        cls, budget_s: float, concurrencies: Sequence[int], memory_requests: int, repeats: int | None
    ) -> Plan:
        full = budget_s >= 120
        repeats = repeats or (3 if full else 1)
        fractions = list(OPEN_FRACTIONS) if full else [0.5, 0.8]  # short: the 80 % target among them
        closed = 0.5 * budget_s
        # Both services on the mix at every concurrency, the batched one on the uniform workload at
        # up to three, and one warm-up run per service.
        runs = (2 * len(concurrencies) + len(scenes_concurrencies(concurrencies))) * repeats + 2
        open_total = 0.17 * budget_s
        return cls(
            budget_s=budget_s,
            concurrencies=list(concurrencies),
            repeats=repeats,
            run_s=max(1.0, closed / runs),
            warm_s=max(1.0, closed / runs),
            open_fractions=fractions,
            open_s=max(1.0, 0.8 * open_total / len(fractions)),
            drain_s=min(10.0, max(2.0, 0.2 * open_total / len(fractions))),
            memory_requests=memory_requests,
            memory_cap_s=max(2.0, 0.2 * budget_s),
            memory_concurrency=16,
            inprocess_repeats=5 if full else 2,
            pipeline_s=max(0.3, 0.006 * budget_s),
            pipeline_repeats=3 if full else 1,
            all_sizes=full,
            # Five starts in all: a median that one or two starts after a page-cache eviction of torch's
            # libraries (the time goes to the disk, before the service runs) cannot move.
            extra_starts=4 if full else 0,
            spread_s=max(0.5, 0.006 * budget_s),
        )


@dataclass
class Workload:
    name: str  # "mixed": the realistic mix; "scenes": /predict with ShapesQA scenes only
    payloads: list[Payload]
    requests: list[bytes]
    requests_file: Path


@dataclass
class ClosedRun(Latencies):
    server: str
    workload: str
    concurrency: int
    repeat: int
    generator: str
    server_cpu_s: float = 0.0
    foreign_cpu: float = 0.0  # cores other processes kept busy during the run, on average
    stages: dict[str, float] = field(default_factory=dict)
    batches: dict[float, float] = field(default_factory=dict)


@dataclass
class OpenRun:
    workload: str
    fraction: float
    offered_rate: float
    sent: int
    answered: int
    ok: int
    shed: int  # 429
    other_status: int
    unanswered: int
    errors: int
    ok_per_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    p999_s: float
    send_lag_p99_s: float
    generator_cpu_s: float
    server_cpu_s: float
    foreign_cpu: float = 0.0
    deadline_ms: int | None = None  # every request's X-Request-Timeout-Ms, if any
    within_deadline: int = 0  # 200s answered within it, by the generator's clock (from the intended send)
    within_deadline_server: float = 0.0  # the same by the service's own count (from the request's first byte)
    error_kinds: dict[str, int] = field(default_factory=dict)  # connection errors by exception name
    stages: dict[str, float] = field(default_factory=dict)
    batches: dict[float, float] = field(default_factory=dict)
    # The 200s by picture ("text" for a request without one): count, p50_s, p99_s. A mix's p99 is
    # its slowest pictures' whenever they are more than 1 % of the requests.
    by_picture: dict[str, dict[str, float]] = field(default_factory=dict)


def latencies_by_picture(result: loadgen.RunResult, payloads: Sequence[Payload]) -> dict[str, dict[str, float]]:
    """Each picture's 200s: how many, and their p50 and p99 (seconds)."""
    grouped: dict[str, list[float]] = {}
    if not payloads:
        return {}
    for latency, status, index in zip(result.latencies, result.statuses, result.indices, strict=True):
        if status == 200:
            grouped.setdefault(payloads[index].image_name or "text", []).append(latency)
    return {
        name: {"count": len(values), "p50_s": loadgen.percentile(values, 50), "p99_s": loadgen.percentile(values, 99)}
        for name, values in sorted(grouped.items())
    }


# -- environment -----------------------------------------------------------------------------------


def trainer_running() -> list[str]:
    found = subprocess.run(["pgrep", "-af", "trainer fit"], capture_output=True, text=True, check=False).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in (
        "torch",
        "numpy",
        "pillow",
        "fastapi",
        "starlette",
        "uvicorn",
        "python-multipart",
        "uvloop",
        "httptools",
    ):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    cpu = "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    memory = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return {
        "date": datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "wrk": wrk_version(),
        "commit": commit.strip() + (" (with uncommitted changes)" if dirty.strip() else ""),
        "load_average_before": os.getloadavg(),
        "trainer_before": trainer_running(),
    }


# -- the model -------------------------------------------------------------------------------------


def resolve_model(model: Path | None) -> tuple[Path, str]:
    """The package to measure, and where it came from."""
    if model is not None:
        return model, "given"
    shipped = ROOT / "weights" / "shapesqa"
    if (shipped / "manifest.json").is_file():
        return shipped, "shipped"
    import torch

    from model.config import FusionConfig
    from model.export import export_random_package
    from model.manifest import PackageError
    from model.package import load_package
    from trainer.shapesqa import LABELS

    config = FusionConfig(num_labels=len(LABELS))
    # Keyed by the architecture and torch: a changed default config or runtime exports a new one.
    key = hashlib.sha256(f"{config.to_json()} {torch.__version__}".encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"fusionserve-bench-default-{key}"
    try:
        load_package(target, check_golden=False)
    except PackageError:
        export_random_package(target, config, LABELS, seed=0, name="default-random")
    return target, "random weights, default FusionConfig"


def server_settings(model: Path, server_args: Sequence[str]) -> Any:
    """The settings the service will run with (flags and FUSION_* variables), for the in-process side."""
    from pydantic_settings import CliApp

    from app.config import Settings

    return CliApp.run(Settings, cli_args=["--model", str(model), *server_args])


def start_record(server: str, started: Server) -> dict[str, Any]:
    return {"server": server, "ready_s": started.ready_s, "phases": started.startup_phases, **started.startup_disk}


def without_flag(args: Sequence[str], flag: str) -> list[str]:
    result: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        result.append(arg)
    return result


# -- load ------------------------------------------------------------------------------------------


def closed_run(
    server: Server, workload: Workload, concurrency: int, seconds: float, generator: str, repeat: int
) -> ClosedRun:
    server.wait_idle()
    before, cpu, busy = server.metrics(), server.cpu_s(), machine_busy_s()
    if generator == "wrk":
        latencies = run_wrk(server.port, workload.requests_file, concurrency, seconds)
    else:
        latencies = loadgen.run_async(
            lambda: loadgen.closed_loop("127.0.0.1", server.port, workload.requests, concurrency, duration_s=seconds)
        ).summary()
    record = ClosedRun(
        **asdict(latencies),
        server=server.name,
        workload=workload.name,
        concurrency=concurrency,
        repeat=repeat,
        generator=generator,
    )
    busy = machine_busy_s() - busy
    record.server_cpu_s = server.cpu_s() - cpu
    record.foreign_cpu = max(0.0, busy - record.server_cpu_s - record.generator_cpu_s) / max(record.elapsed_s, 1e-9)
    delta = diff(server.metrics(), before)
    record.stages = stage_breakdown(delta)
    record.batches = batch_histogram(delta)
    return record


def open_run(
    server: Server, workload: Workload, fraction: float, rate: float, plan: Plan, deadline_ms: int | None = None
) -> OpenRun:
    server.wait_idle()
    before, cpu, busy = server.metrics(), server.cpu_s(), machine_busy_s()
    began = time.perf_counter()
    r = loadgen.run_async(
        lambda: loadgen.open_loop(
            "127.0.0.1",
            server.port,
            workload.requests,
            rate,
            plan.open_s,
            seed=round(rate * 1000),
            drain_s=plan.drain_s,
        )
    )
    busy = machine_busy_s() - busy
    server_cpu = server.cpu_s() - cpu
    foreign = max(0.0, busy - server_cpu - r.generator_cpu_s) / (time.perf_counter() - began)
    delta = diff(server.metrics(), before)
    ok = r.ok_latencies()
    # Requests without an answer when the drain ran out count as infinitely late, not as absent.
    censored = ok + [float("inf")] * r.unanswered
    statuses = r.status_counts()
    return OpenRun(
        workload=workload.name,
        fraction=fraction,
        offered_rate=rate,
        sent=len(r.send_lag),
        answered=r.completed,
        ok=statuses.get(200, 0),
        shed=statuses.get(429, 0),
        other_status=sum(count for status, count in statuses.items() if status not in (200, 429)),
        unanswered=r.unanswered,
        errors=r.connection_errors,
        error_kinds=dict(r.error_kinds),
        ok_per_s=statuses.get(200, 0) / plan.open_s,
        p50_s=loadgen.percentile(censored, 50),
        p90_s=loadgen.percentile(censored, 90),
        p99_s=loadgen.percentile(censored, 99),
        p999_s=loadgen.percentile(censored, 99.9),
        send_lag_p99_s=loadgen.percentile(r.send_lag, 99),
        generator_cpu_s=r.generator_cpu_s,
        server_cpu_s=server_cpu,
        foreign_cpu=foreign,
        deadline_ms=deadline_ms,
        within_deadline=sum(latency <= deadline_ms / 1000 for latency in ok) if deadline_ms else 0,
        within_deadline_server=total(delta, "fusion_requests_within_deadline_total"),
        stages=stage_breakdown(delta),
        batches=batch_histogram(delta),
        by_picture=latencies_by_picture(r, workload.payloads),
    )


def deadline_workload(workload: Workload, deadline_ms: int, out: Path) -> Workload:
    """The workload with every request allowing `deadline_ms` (X-Request-Timeout-Ms)."""
    requests = with_deadline(workload.requests, deadline_ms)
    name = f"{workload.name}-{deadline_ms}ms"
    return Workload(name, workload.payloads, requests, write_requests(requests, out / f"requests-{name}.bin"))


def memory_run(server: Server, rotation: Sequence[tuple[bytes, int]], plan: Plan) -> dict[str, Any]:
    """Resident memory while `plan.memory_requests` good and bad requests go through (or the time cap ends it)."""
    count = plan.memory_requests
    samples: list[tuple[int, int]] = [(0, server.rss_bytes())]
    every = max(1, count // 50)

    def sample(answered: int) -> None:
        if answered % every == 0:
            samples.append((answered, server.rss_bytes()))

    r = loadgen.run_async(
        lambda: loadgen.closed_loop(
            "127.0.0.1",
            server.port,
            [request for request, _ in rotation],
            plan.memory_concurrency,
            count=count,
            duration_s=plan.memory_cap_s,
            expected=[status for _, status in rotation],
            on_answer=sample,
        )
    )
    samples.append((r.completed, server.rss_bytes()))
    warm_index = next((i for i, (n, _) in enumerate(samples) if n >= r.completed * 0.1), 0)
    warm = samples[warm_index][1]
    statuses = r.status_counts()
    return {
        "requests": r.completed,
        "planned": count,
        "seconds": r.elapsed_s,
        "bad": sum(c for s, c in statuses.items() if s != 200),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "unexpected_status": r.unexpected,
        "errors": r.connection_errors,
        "rss_start": samples[0][1],
        "rss_warm": warm,
        "rss_warm_at": samples[warm_index][0],
        "rss_end": samples[-1][1],
        "rss_peak": max(rss for _, rss in samples),
        "growth_after_warmup": samples[-1][1] - warm,
        "samples": samples,
    }


@contextmanager
def measuring_in_process(threads: int, servers: Sequence[Server] = ()) -> Iterator[None]:
    """In-process measurements: the services idle first, torch at the service's intra-op thread
    count meanwhile, and the caller's own count back after (a test run's, say)."""
    import torch

    for server in servers:
        server.wait_idle()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)


def recheck_ceilings(
    package: ModelPackage,
    prepared: dict[str, list[inprocess.Prepared]],
    ceilings: dict[str, inprocess.Ceilings],
    threads: int,
    plan: Plan,
    servers: Sequence[Server],
) -> None:
    """Before each closed-loop repeat, the in-process sides of the targets again (inprocess.recheck),
    with the services idle: both sides of each ratio are then spread over the same minutes."""
    with measuring_in_process(threads, servers):
        for name, ceiling in ceilings.items():
            inprocess.recheck(
                package,
                prepared[name],
                ceiling,
                repeats=plan.inprocess_repeats,
                pipeline_seconds=plan.pipeline_s,
                # Once, on the uniform workload: its calls all cost about the same.
                spread_seconds=plan.spread_s if name == "scenes" else 0.0,
            )
            spread = ""
            if ceiling.spread_calls_s:
                calls = ceiling.spread_calls_s[-1]
                spread = f", spread p99/p50 {loadgen.percentile(calls, 99) / loadgen.percentile(calls, 50):.2f}"
            log(
                f"in-process recheck {name}: best batch {ceiling.best_batch} "
                f"{ceiling.pipeline_rate[ceiling.best_batch][-1]:.0f} items/s, "
                f"batch-1 cost {ceiling.batch1_cost_medians_s[-1] * 1e3:.2f} ms{spread}"
            )


def recheck_in_order(
    package: ModelPackage,
    prepared: Sequence[inprocess.Prepared],
    ceiling: inprocess.Ceilings,
    threads: int,
    servers: Sequence[Server],
) -> None:
    """The concurrency-1 target's in-process side (inprocess.recheck_in_order), with the services
    idle, just before the batched service's run at concurrency 1 it is paired with."""
    with measuring_in_process(threads, servers):
        median = inprocess.recheck_in_order(package, prepared, ceiling)
    log(f"in-process batch-1 cost, each request once in order: {median * 1e3:.2f} ms")


def median_cells(runs: Sequence[ClosedRun]) -> dict[str, dict[str, float]]:
    """Per "server/workload/concurrency": medians over the repeats of throughput and latency percentiles."""
    cells: dict[str, list[ClosedRun]] = {}
    for run in runs:
        cells.setdefault(f"{run.server}/{run.workload}/{run.concurrency}", []).append(run)
    result = {}
    for key, group in cells.items():
        result[key] = {
            "throughput": statistics.median(r.throughput for r in group),
            "throughput_min": min(r.throughput for r in group),
            "throughput_max": max(r.throughput for r in group),
            "p50_s": statistics.median(r.p50_s for r in group),
            "p90_s": statistics.median(r.p90_s for r in group),
            "p99_s": statistics.median(r.p99_s for r in group),
            "p999_s": statistics.median(r.p999_s for r in group),
            "non_2xx": sum(r.non_2xx for r in group),
            "errors": sum(r.errors for r in group),
            "requests": sum(r.requests for r in group),
            "generator_cpu_per_request_s": sum(r.generator_cpu_s for r in group)
            / max(1, sum(r.requests for r in group)),
            "server_cpu_per_request_s": sum(r.server_cpu_s for r in group) / max(1, sum(r.requests for r in group)),
            "repeats": len(group),
            "foreign_cpu_max": max(r.foreign_cpu for r in group),
        }
    return result


# -- the run ---------------------------------------------------------------------------------------


def log_open(run_open: OpenRun) -> OpenRun:
    log(
        f"open {run_open.workload:6} {run_open.fraction:4.2f} x saturation = {run_open.offered_rate:6.1f}/s: "
        f"ok {run_open.ok_per_s:6.1f}/s, p50 {run_open.p50_s * 1e3:7.1f} ms, p99 {run_open.p99_s * 1e3:7.1f} ms, "
        f"shed {run_open.shed}, unanswered {run_open.unanswered}"
        + (f", within {run_open.deadline_ms} ms {run_open.within_deadline}" if run_open.deadline_ms else "")
    )
    return run_open


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def run(
    *,
    model: Path | None,
    out: Path,
    budget_s: float = DEFAULT_BUDGET_S,
    concurrencies: Sequence[int] = DEFAULT_CONCURRENCY,
    repeats: int | None = None,
    generator: str = "auto",
    memory_requests: int = 20_000,
    mix: MixSpec | None = None,
    server_args: Sequence[str] = (),
) -> Path:
    began = time.perf_counter()
    mix = mix or MixSpec()
    out.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))  # open loop: many sockets
    env = environment()
    if generator == "auto":
        generator = "wrk" if wrk_path() else "python"
    plan = Plan.for_budget(budget_s, concurrencies, memory_requests, repeats)
    model_dir, model_source = resolve_model(model)
    settings = server_settings(model_dir, server_args)
    threads = settings.intra_op_threads(on_cuda=False)
    log(
        f"model {model_dir} ({model_source}); {threads} intra-op thread(s); "
        f"generator {generator}; budget {budget_s:.0f} s"
    )

    log("building the payloads")
    manifest = read_manifest(model_dir)
    pictures = build_pictures(mix)
    workloads: dict[str, Workload] = {}
    for name, spec in (("mixed", mix), ("scenes", mix.scenes_only())):
        payloads = build_mix(spec, manifest.max_text_length, pictures)
        requests = [p.request() for p in payloads]
        workloads[name] = Workload(name, payloads, requests, write_requests(requests, out / f"requests-{name}.bin"))
    mixed = workloads["mixed"]
    scenes_at = scenes_concurrencies(plan.concurrencies)

    log("in-process ceilings")
    import torch

    ceilings: dict[str, inprocess.Ceilings] = {}
    with measuring_in_process(threads):
        from app.graph_optimization import applies

        optimize = settings.optimize_graph and applies(torch.device("cpu"), settings.precision)
        package, graph_optimized = inprocess.load(model_dir, threads, optimize)
        prepared = {
            name: inprocess.prepare(workload.payloads, package.manifest, plan.inprocess_repeats)
            for name, workload in workloads.items()
        }
        for name in workloads:
            ceilings[name] = inprocess.measure(
                package,
                prepared[name],
                threads=threads,
                max_batch=settings.max_batch_size,
                repeats=plan.inprocess_repeats,
                pipeline_seconds=plan.pipeline_s,
                pipeline_repeats=plan.pipeline_repeats,
                all_sizes=plan.all_sizes,
                stages=name == "mixed",
            )

    log("starting the services")
    unbatched_args = [*without_flag(server_args, "--max-batch-size"), "--max-batch-size", "1"]
    starts: list[dict[str, Any]] = []
    batched = start_server("batched", model_dir, list(server_args), out)
    starts.append(start_record("batched", batched))
    served_info = batched.info()
    served_graph_optimized = bool(served_info["graph_optimized"])  # on a CUDA host: as loaded
    unbatched = start_server("unbatched", model_dir, unbatched_args, out)
    starts.append(start_record("unbatched", unbatched))
    rss_ready = {"batched": batched.rss_bytes(), "unbatched": unbatched.rss_bytes()}
    overall_before = batched.metrics()
    closed: list[ClosedRun] = []
    floor: ClosedRun | None = None
    open_runs: list[OpenRun] = []
    memory: dict[str, Any] = {}
    try:
        for server in (batched, unbatched):
            closed_run(server, mixed, max(plan.concurrencies), plan.warm_s, generator, -1)
        # The framework's floor: the cheapest route through the same server (HTTP, middleware, metrics).
        health_request = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"
        health = Workload(
            "healthz", [], [health_request], write_requests([health_request], out / "requests-healthz.bin")
        )
        floor = closed_run(batched, health, 8, min(3.0, plan.run_s), generator, -1)
        log(
            f"GET /healthz: {floor.throughput:.0f} req/s, "
            f"{floor.server_cpu_s / max(1, floor.requests) * 1e3:.3f} ms of server CPU each"
        )
        for repeat in range(plan.repeats):
            services = (batched, unbatched)
            recheck_ceilings(package, prepared, ceilings, threads, plan, services)
            for concurrency in plan.concurrencies:
                cells = [(batched, mixed), (unbatched, mixed)]
                if concurrency in scenes_at:
                    cells.append((batched, workloads["scenes"]))
                for server, workload in cells:
                    if concurrency == 1 and server is batched:
                        recheck_in_order(package, prepared[workload.name], ceilings[workload.name], threads, services)
                    run_ = closed_run(server, workload, concurrency, plan.run_s, generator, repeat)
                    closed.append(run_)
                    log(
                        f"closed {server.name:9} {workload.name:6} c={concurrency:<3} #{repeat}: "
                        f"{run_.throughput:7.1f} req/s, p50 {run_.p50_s * 1e3:6.1f} ms, "
                        f"p99 {run_.p99_s * 1e3:6.1f} ms, non-2xx {run_.non_2xx}"
                    )
        unbatched.stop()
        del package, prepared
        cells_ = median_cells(closed)
        saturation = max(cells_[f"batched/mixed/{c}"]["throughput"] for c in plan.concurrencies)
        for fraction in plan.open_fractions:
            rate = max(1.0, fraction * saturation)
            open_runs.append(log_open(open_run(batched, mixed, fraction, rate, plan)))
        # The uniform workload at 80 % of its own saturation: the open-loop target without the photos,
        # whose decoding alone is longer than four c=1 medians.
        scenes_saturation = max(cells_[f"batched/scenes/{c}"]["throughput"] for c in scenes_at)
        scenes_rate = max(1.0, 0.8 * scenes_saturation)
        open_runs.append(log_open(open_run(batched, workloads["scenes"], 0.8, scenes_rate, plan)))
        overload = deadline_workload(workloads["scenes"], OVERLOAD_DEADLINE_MS, out)
        overload_rate = OVERLOAD_SHARE * scenes_saturation
        overloaded = open_run(batched, overload, OVERLOAD_SHARE, overload_rate, plan, OVERLOAD_DEADLINE_MS)
        open_runs.append(log_open(overloaded))
        log(f"memory: {plan.memory_requests} requests, one in four bad")
        memory = memory_run(batched, memory_rotation(mixed.payloads, manifest.max_text_length), plan)
        log(
            f"memory: {memory['requests']} requests, RSS {memory['rss_warm'] / 2**20:.1f} -> "
            f"{memory['rss_end'] / 2**20:.1f} MiB after warm-up"
        )
        overall = diff(batched.metrics(), overall_before)
    finally:
        batched.stop()
        unbatched.stop()
    for index in range(plan.extra_starts):
        extra = start_server(f"batched-start{index + 2}", model_dir, list(server_args), out)
        starts.append(start_record("batched", extra))
        extra.stop()
    env["load_average_after"] = os.getloadavg()
    env["trainer_after"] = trainer_running()

    from app.decode_pool import decode_nice_in_force  # the app's settings import torch: not at import time

    results = {
        "environment": env,
        "model": {
            "path": str(model_dir),
            "source": model_source,
            "name": manifest.name,
            "version": manifest.version,
            "sha256": manifest.archive_sha256,
            "image_size": list(manifest.image_size),
            "max_text_length": manifest.max_text_length,
            "embedding_dim": manifest.embedding_dim,
            "labels": len(manifest.labels),
            "config": manifest.model_config,
        },
        "settings": {
            "server_args": list(server_args),
            "unbatched_args": unbatched_args,
            "threads": threads,
            "decode_workers": settings.decode_threads(),
            "decode_nice": decode_nice_in_force(settings),
            "graph_optimized": served_graph_optimized,
            "ceiling_graph_optimized": graph_optimized,
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue": settings.max_queue,
            # Their defaults depend on the device: the values the service reports it runs with.
            "inline_decode_under_load": served_info["batching"]["inline_decode_under_load"],
            "lookahead_ms": served_info["batching"]["lookahead_ms"],
            "generator": generator,
        },
        "plan": asdict(plan),
        "mix": {
            name: {"counts": describe(w.payloads), "bytes": _bytes_summary(w.payloads)} for name, w in workloads.items()
        },
        "mix_spec": asdict(mix),
        "ceilings": {name: asdict(c) for name, c in ceilings.items()},
        "closed": [asdict(r) for r in closed],
        "closed_medians": median_cells(closed),
        "open": [asdict(r) for r in open_runs],
        "memory": memory,
        "starts": starts,
        "rss_ready": rss_ready,
        "floor": {
            "throughput": floor.throughput,
            "server_cpu_per_request_s": floor.server_cpu_s / max(1, floor.requests),
            "p50_s": floor.p50_s,
        }
        if floor
        else {},
        "overall_batches": batch_histogram(overall),
        "overall_stages": stage_breakdown(overall),
        "wall_s": time.perf_counter() - began,
    }
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1, default=_json_default), encoding="utf-8")
    from bench.report import write_report

    report = write_report(json.loads(path.read_text(encoding="utf-8")), out)
    log(f"report: {report} ({time.perf_counter() - began:.0f} s)")
    return report


def _bytes_summary(payloads: Sequence[Payload]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for payload in payloads:
        if payload.image is not None:
            sizes[payload.image_name] = max(sizes.get(payload.image_name, 0), len(payload.image))
    return sizes


def _json_default(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _size(text: str) -> tuple[int, int]:
    width, height = (int(part) for part in text.lower().split("x"))
    return width, height


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.suite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model package (default: weights/shapesqa, else random weights)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time for the measurements")
    parser.add_argument("--concurrency", type=_ints, default=list(DEFAULT_CONCURRENCY))
    parser.add_argument("--repeats", type=int, help="closed-loop repeats (default: 3, or 1 under 120 s)")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--memory-requests", type=int, default=20_000)
    parser.add_argument("--photo", type=_size, default=(4000, 3000), help="the large photo, WxH (default 4000x3000)")
    parser.add_argument("--slots", type=int, default=200, help="requests in the rotation")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="a `python -m app` flag for both services (repeatable)"
    )
    args = parser.parse_args(argv)
    run(
        model=args.model,
        out=args.out,
        budget_s=args.budget_s,
        concurrencies=args.concurrency,
        repeats=args.repeats,
        generator=args.generator,
        memory_requests=args.memory_requests,
        mix=MixSpec(slots=args.slots, photo=args.photo),
        server_args=args.server_arg,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
