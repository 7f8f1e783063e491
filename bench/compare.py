"""A/B of service settings or code, side by side: `python -m bench.compare --b="--threads 2" [--a=...]
[--a-root DIR] [--model DIR]`.

Starts one service per variant (the same model), then runs the closed loop on them in turns
(A, B, A, B, ...) so that a drift in the machine's load hits both alike, and prints the medians
over the repeats with B/A ratios: of the medians, and the median of each repeat's own ratio (its
A and B ran seconds apart). It also prints each variant's device busy share (the service's batch
time over the run's wall time, from /metrics): a change to dispatch shows there plainly, while
throughput on a 2-core machine moves by more from run to run than such a change gains. For
checking what a settings change gains before adopting it; the flags are `python -m app` flags,
space-separated within one --a/--b value. `--a-root` runs variant A from another checkout
(`git worktree add ../before REV`), to compare two versions. `--deadline-ms N` sends every open-loop
request with that X-Request-Timeout-Ms; with `--open-share` above 1 it measures goodput under overload:
answers within their deadlines per second (the service's own count), since work done for a
request whose deadline has passed is work lost. `--hurried-share S --hurried-ms T` sends, beside the
open loop, a share S of its rate with T ms deadlines: requests hurried enough to come late at any
load, and what they do to the others (the share of those refused with 429, their p50 and p99).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import loadgen
from bench.payloads import MixSpec, build_mix, build_pictures, with_deadline, write_requests
from bench.server import ROOT, Sample, Server, diff, start_server, total
from bench.suite import resolve_model
from bench.wrk import run_wrk, wrk_path
from model.manifest import read_manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--a", default="", help="flags of variant A (default: none, the service's defaults)")
    parser.add_argument("--b", default="", help="flags of variant B")
    parser.add_argument("--a-prelude", help="Python run in A's interpreter before the app, e.g. an interpreter setting")
    parser.add_argument("--b-prelude", help="the same for B")
    parser.add_argument("--a-root", type=Path, default=ROOT, help="the checkout A runs from (default: this one)")
    parser.add_argument("--b-root", type=Path, default=ROOT, help="the same for B")
    parser.add_argument("--workload", choices=("mixed", "scenes"), default="mixed")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--open-share",
        type=float,
        help="then Poisson arrivals at this share of A's best closed-loop 2xx throughput (0.8: the report's target)",
    )
    parser.add_argument("--open-seconds", type=float, default=8.0)
    parser.add_argument("--deadline-ms", type=int, help="X-Request-Timeout-Ms on every open-loop request; goodput")
    parser.add_argument(
        "--hurried-share", type=float, default=0.0, help="of the open loop's rate, sent with --hurried-ms deadlines"
    )
    parser.add_argument("--hurried-ms", type=int, default=15, help="the hurried requests' X-Request-Timeout-Ms")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare")
    args = parser.parse_args(argv)
    if wrk_path() is None:
        sys.stderr.write("bench.compare needs wrk (apt-get install wrk)\n")
        return 2
    model, _ = resolve_model(args.model)
    model = model.resolve()  # the variants may run from other folders
    manifest = read_manifest(model)
    spec = MixSpec() if args.workload == "mixed" else MixSpec().scenes_only()
    payloads = build_mix(spec, manifest.max_text_length, build_pictures(spec))
    args.out.mkdir(parents=True, exist_ok=True)
    # The closed loop measures capacity, without deadlines: with them, a closed loop's clients resend
    # at once each refused request, and the refusals' own cost sets the throughput.
    plain = [p.request() for p in payloads]
    requests = with_deadline(plain, args.deadline_ms) if args.deadline_ms else plain
    requests_file = write_requests(plain, args.out / "requests.bin")
    hurried = with_deadline(plain, args.hurried_ms) if args.hurried_share else []
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    variants = {"A": shlex.split(args.a), "B": shlex.split(args.b)}
    preludes = {"A": args.a_prelude, "B": args.b_prelude}
    roots = {"A": args.a_root.resolve(), "B": args.b_root.resolve()}
    for name, root in roots.items():
        # Without its own app/, `python -m app` there would import the installed one: this checkout.
        if not (root / "app" / "__main__.py").is_file():
            parser.error(f"--{name.lower()}-root {root} is not a checkout of the service (no app/__main__.py)")
    if variants["A"] == variants["B"] and preludes["A"] == preludes["B"] and roots["A"] == roots["B"]:
        parser.error("variants A and B are the same")
    servers = {
        name: start_server(name, model, flags, args.out, prelude=preludes[name], root=roots[name])
        for name, flags in variants.items()
    }
    results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    # 2xx answers per second: with deadlines, a closed loop also gets 429s, answered at once, and
    # the open loop's rate is a share of what the service serves, not of what it refuses.
    served: dict[tuple[str, int], list[float]] = {}
    open_results: dict[str, list[OpenOutcome]] = {}
    goodput: dict[str, list[float]] = {}  # answers within their deadline per second, per repeat
    try:
        for name, server in servers.items():
            run_wrk(server.port, requests_file, max(concurrencies), 2)  # warm
            described = " ".join(variants[name]) or "(defaults)"
            if preludes[name]:
                described += f" with prelude {preludes[name]!r}"
            if roots[name] != ROOT:
                described += f" from {roots[name]}"
            print(f"{name}: {described}: ready in {server.ready_s:.2f} s")
        for repeat in range(args.repeats):
            for concurrency in concurrencies:
                for name, server in servers.items():
                    before = server.metrics()
                    w = run_wrk(server.port, requests_file, concurrency, args.seconds)
                    busy = device_busy_share(server, before, w.elapsed_s)
                    results.setdefault((name, concurrency), []).append((w.throughput, w.p50_s, w.p99_s, busy))
                    ok = w.requests - w.non_2xx
                    served.setdefault((name, concurrency), []).append(ok / w.elapsed_s if w.elapsed_s > 0 else 0.0)
                    print(
                        f"  #{repeat} {name} c={concurrency}: {w.throughput:.1f} req/s ({ok} of {w.requests} 2xx), "
                        f"p50 {w.p50_s * 1e3:.1f} ms, p99 {w.p99_s * 1e3:.1f} ms, device busy {busy:.1%}"
                    )
        if args.open_share:
            saturation = max(statistics.median(served[("A", c)]) for c in concurrencies)
            rate = args.open_share * saturation
            for repeat in range(args.repeats):
                for name, server in servers.items():
                    before = server.metrics()
                    opened = open_run(
                        server, requests, rate, args.open_seconds, repeat, hurried, args.hurried_share, args.hurried_ms
                    )
                    within = total(diff(server.metrics(), before), "fusion_requests_within_deadline_total")
                    open_results.setdefault(name, []).append(opened)
                    goodput.setdefault(name, []).append(within / args.open_seconds)
                    print(
                        f"  #{repeat} {name} open loop at {rate:.0f}/s: p50 {opened.p50_s * 1e3:.1f} ms, p99"
                        f" {opened.p99_s * 1e3:.1f} ms, {within / args.open_seconds:.0f}/s answered within their"
                        f" deadlines" + (f"; {opened.describe_hurried()}" if hurried else "")
                    )
    finally:
        for server in servers.values():
            server.stop()
    print(
        "\n| c | A req/s | B req/s | B/A | B/A per repeat (median) | A p50 | B p50 | A p99 | B p99 "
        f"| A device busy | B device busy |  ({args.workload}, {model})"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for concurrency in concurrencies:
        a_runs, b_runs = results[("A", concurrency)], results[("B", concurrency)]
        a = [statistics.median(v) for v in zip(*a_runs, strict=True)]
        b = [statistics.median(v) for v in zip(*b_runs, strict=True)]
        paired = paired_ratio([run[0] for run in a_runs], [run[0] for run in b_runs])
        print(
            f"| {concurrency} | {a[0]:.1f} | {b[0]:.1f} | {b[0] / a[0]:.2f} | {paired:.2f} | {a[1] * 1e3:.1f} | "
            f"{b[1] * 1e3:.1f} | {a[2] * 1e3:.1f} | {b[2] * 1e3:.1f} | {a[3]:.1%} | {b[3]:.1%} |"
        )
    if open_results:
        a_p50, b_p50 = (statistics.median(run.p50_s for run in open_results[name]) for name in ("A", "B"))
        a_p99, b_p99 = (statistics.median(run.p99_s for run in open_results[name]) for name in ("A", "B"))
        print(
            f"\nopen loop at {args.open_share:g} x A's best closed-loop throughput ({rate:.0f}/s), medians of "
            f"{args.repeats}: p50 {a_p50 * 1e3:.1f} / {b_p50 * 1e3:.1f} ms, p99 {a_p99 * 1e3:.1f} / {b_p99 * 1e3:.1f} "
            f"ms (A / B); p99 B/A {b_p99 / a_p99:.2f}"
        )
        if hurried:
            a_refused, b_refused = (statistics.median(run.refused for run in open_results[name]) for name in ("A", "B"))
            a_in_time, b_in_time = (
                statistics.median(run.hurried_in_time for run in open_results[name]) for name in ("A", "B")
            )
            print(
                f"beside {args.hurried_share:.0%} more with {args.hurried_ms} ms deadlines, the others refused with"
                f" 429, medians of {args.repeats}: {a_refused:.1%} / {b_refused:.1%} (A / B); the hurried answered"
                f" 200 within their deadlines (the generator's clock): {a_in_time:.1%} / {b_in_time:.1%} (A / B)"
            )
        if args.deadline_ms:
            a_good, b_good = (statistics.median(goodput[name]) for name in ("A", "B"))
            print(
                f"goodput with {args.deadline_ms} ms deadlines, answers within them per second, medians of "
                f"{args.repeats}: {a_good:.0f} / {b_good:.0f} (A / B)"
            )
    return 0


@dataclass(frozen=True)
class OpenOutcome:
    p50_s: float  # of the 200s, from each intended send time; an unanswered request infinitely late
    p99_s: float
    refused: float  # the share answered 429
    hurried: dict[int, int]  # the hurried requests' statuses (none sent: empty)
    hurried_in_time: float = 0.0  # the share of them answered 200 within their deadline, by the generator's clock

    def describe_hurried(self) -> str:
        return (
            f"{self.refused:.1%} refused with 429; the hurried: {dict(sorted(self.hurried.items()))},"
            f" {self.hurried_in_time:.1%} of them 200 in time"
        )


def open_run(
    server: Server,
    requests: list[bytes],
    rate: float,
    seconds: float,
    seed: int,
    hurried: list[bytes] | None = None,
    hurried_share: float = 0.0,
    hurried_ms: float = math.inf,
) -> OpenOutcome:
    """Poisson arrivals (bench.loadgen), latency from each intended send time, as in the report;
    with `hurried`, a second stream of them at `hurried_share` times the rate, beside it."""

    async def streams() -> list[loadgen.RunResult]:
        main = loadgen.open_loop("127.0.0.1", server.port, requests, rate, seconds, seed=seed)
        if not hurried:
            return [await main]
        beside = loadgen.open_loop("127.0.0.1", server.port, hurried, rate * hurried_share, seconds, seed=seed + 1000)
        return list(await asyncio.gather(main, beside))

    runs = loadgen.run_async(streams)
    run = runs[0]
    latencies = run.ok_latencies() + [math.inf] * run.unanswered
    answered = len(run.statuses) + run.unanswered
    refused = run.status_counts().get(429, 0) / answered if answered else 0.0
    statuses: dict[int, int] = {}
    in_time = 0.0
    if len(runs) > 1:
        beside = runs[1]
        statuses = beside.status_counts()
        sent = len(beside.statuses) + beside.unanswered
        in_time = sum(latency <= hurried_ms / 1000 for latency in beside.ok_latencies()) / sent if sent else 0.0
    return OpenOutcome(loadgen.percentile(latencies, 50), loadgen.percentile(latencies, 99), refused, statuses, in_time)


def device_busy_share(server: Server, before: dict[Sample, float], elapsed_s: float) -> float:
    """The share of a run's wall time the service spent running batches (its batch-time histogram)."""
    delta = diff(server.metrics(), before)
    return total(delta, "fusion_batch_duration_seconds_sum") / elapsed_s if elapsed_s > 0 else 0.0


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over repeats of B/A, each repeat's B against its own A."""
    return statistics.median(y / x for x, y in zip(a, b, strict=True) if x > 0)


if __name__ == "__main__":
    sys.exit(main())
