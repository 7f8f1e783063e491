"""bench/results/report.md and its plots, from the suite's results as read back from results.json
(so every mapping key is a string, whatever it was when measured).

`python -m bench.report [DIR]` rebuilds the report from DIR/results.json without measuring again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from bench.loadgen import percentile  # noqa: E402

STAGES = (
    ("decode", "parse + decode + tokenize (pool)"),
    ("queue", "batch queue wait"),
    ("device", "batch on the device"),
    ("other", "HTTP, body, event loop, response"),
)
WORKLOADS = {
    "mixed": "realistic mix",
    "scenes": "uniform: /predict, scenes only",
}

Results = dict[str, Any]


def ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "n/a"
    if math.isinf(seconds):
        return "∞"
    return f"{seconds * 1e3:.1f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def cell(results: Results, server: str, workload: str, concurrency: int) -> dict[str, float] | None:
    found: dict[str, float] | None = results["closed_medians"].get(f"{server}/{workload}/{concurrency}")
    return found


def cell_keys(results: Results) -> list[tuple[str, str, int]]:
    keys = [(k.split("/")[0], k.split("/")[1], int(k.split("/")[2])) for k in results["closed_medians"]]
    order = {"mixed": 0, "scenes": 1}
    return sorted(keys, key=lambda k: (order.get(k[1], 2), k[0], k[2]))


def runs_of(results: Results, server: str, workload: str, concurrency: int) -> list[dict[str, Any]]:
    return [
        r
        for r in results["closed"]
        if r["server"] == server and r["workload"] == workload and r["concurrency"] == concurrency
    ]


def ceiling_rate(results: Results, workload: str, batch: int | None = None) -> float:
    ceilings = results["ceilings"][workload]
    rates = ceilings["pipeline_rate"][str(batch if batch is not None else ceilings["best_batch"])]
    return float(statistics.median(rates))


FOREIGN_LIMIT = 0.15  # cores of other processes' CPU during a run above which it counts as contended


def contended(results: Results) -> str | None:
    env = results["environment"]
    trainer = env["trainer_before"] or env["trainer_after"]
    load = env["load_average_before"][0]
    cores = env["cores"]
    runs = results["closed"] + results["open"]
    busy = [r for r in runs if r.get("foreign_cpu", 0.0) > FOREIGN_LIMIT]
    reasons = []
    if trainer:
        reasons.append(f"a training process was running (`{trainer[0][:120]}`)")
    if busy:
        worst = max(r["foreign_cpu"] for r in busy)
        reasons.append(
            f"other processes kept up to {worst:.2f} of the {cores} cores busy during {len(busy)} of the "
            f"{len(runs)} load runs (column 'foreign CPU')"
        )
    if load > 0.5 * cores and not busy:
        reasons.append(f"the machine was busy before the run (load average {load:.2f} on {cores} cores)")
    return "; ".join(reasons) or None


# -- targets ---------------------------------------------------------------------------------------

Check = tuple[str, bool | None]  # (measured text, met; None when only reported)


def per_repeat(
    results: Results,
    workload: str,
    concurrency: int,
    series: Sequence[float],
    combine: Callable[[dict[str, Any], float], float],
) -> list[float]:
    """`combine(run, measured)` for each closed-loop repeat of the batched service at `concurrency`,
    `measured` the in-process recheck made just before that repeat (or just before its c=1 run, for
    the in-order batch-1 cost): `inprocess.recheck` and `recheck_in_order` append one
    to the end of `series` per repeat, in order. Empty for results from before the rechecks."""
    rechecks = results["ceilings"][workload].get("rechecks", 0)
    if not rechecks or len(series) < rechecks:
        return []
    rechecked = series[len(series) - rechecks :]
    runs = {run.get("repeat"): run for run in runs_of(results, "batched", workload, concurrency)}
    return [combine(runs[repeat], rechecked[repeat]) for repeat in range(rechecks) if repeat in runs]


def _per_repeat_text(whole_run: str, what: str, values: Sequence[str], target: str) -> str:
    return f"{whole_run}; per repeat, against the {what} measured just before it: {', '.join(values)} = **{target}**"


def _c32_against(
    results: Results, workload: str, c32: Mapping[str, float], rates: Sequence[float], what: str
) -> tuple[str, float]:
    """Throughput at c=32 over an in-process rate (its median over the run), and the median of each
    repeat's throughput over the rate measured just before it, when there were rechecks: the
    machine's speed drifts within a run, and a ratio's two sides measured seconds apart share it."""
    whole_run = f"{c32['throughput']:.0f} / {statistics.median(rates):.0f} req/s"
    ratio = c32["throughput"] / statistics.median(rates)
    pairs = per_repeat(results, workload, 32, rates, lambda run, rate: run["throughput"] / rate)
    if not pairs:
        return f"{whole_run} = **{ratio:.2f}**", ratio
    ratio = statistics.median(pairs)
    return _per_repeat_text(whole_run, what, [f"{pair:.2f}" for pair in pairs], f"{ratio:.2f}"), ratio


def _per_workload(results: Results, workload: str) -> dict[str, Check]:
    checks: dict[str, Check] = {}
    c1, c32, c64 = (cell(results, "batched", workload, c) for c in (1, 32, 64))
    measured: dict[str, Any] = results["ceilings"].get(workload, {})
    if c32:
        best = str(measured["best_batch"])
        text, ratio = _c32_against(results, workload, c32, measured["pipeline_rate"][best], "ceiling")
        checks["ceiling"] = (text, ratio >= 0.95)
        # The same runs' forward time alone: a service that preprocesses beside the forward pass (on
        # the event loop and in its pool) can approach this, where the serial ceiling above it cannot.
        if forward := measured.get("forward_rate", {}).get(best):
            checks["forward_bound"] = (_c32_against(results, workload, c32, forward, "rate")[0], None)
    for name, found, concurrency in (("tail32", c32, 32), ("tail64", c64, 64)):
        if found:
            tail = found["p99_s"] / found["p50_s"]
            text = f"{ms(found['p99_s'])} / {ms(found['p50_s'])} ms = **{tail:.2f}**"
            # Each repeat's p99 over its own p50: the medians of the two may come from different
            # repeats, a fast repeat's p50 over a slow one's p99.
            runs = sorted(runs_of(results, "batched", workload, concurrency), key=lambda run: run.get("repeat", 0))
            if len(runs) > 1:
                tails = [run["p99_s"] / run["p50_s"] for run in runs]
                tail = statistics.median(tails)
                whole_run = f"{ms(found['p99_s'])} / {ms(found['p50_s'])} ms"
                text = f"{whole_run}; per repeat: {', '.join(f'{t:.2f}' for t in tails)} = **{tail:.2f}**"
            checks[name] = (text, tail <= 1.25)
    if c1:
        # Each request once, in the clients' order (inprocess.batch1_in_order); results from before it:
        # each call repeated back to back.
        in_order = measured.get("batch1_in_order_medians_s") or []
        costs = in_order or measured.get("batch1_cost_medians_s", [])
        cost = statistics.median(in_order) if in_order else measured["batch1_cost_median_s"]
        over = c1["p50_s"] - cost
        whole_run = f"{ms(c1['p50_s'])} - {ms(cost)} ms"
        text = f"{whole_run} = **{over * 1e3:+.2f} ms**"
        gaps = per_repeat(results, workload, 1, costs, lambda run, cost: run["p50_s"] - cost)
        if gaps:
            over = statistics.median(gaps)
            text = _per_repeat_text(whole_run, "cost", [f"{gap * 1e3:+.2f}" for gap in gaps], f"{over * 1e3:+.2f} ms")
        if in_order:
            text += f" (in-process each call repeated back to back: {ms(measured['batch1_cost_median_s'])} ms)"
        checks["c1"] = (text, over <= 0.001)
    spread = measured.get("spread_calls_s") or []
    if spread:
        pooled = [seconds for calls in spread for seconds in calls]
        p50, p99 = percentile(pooled, 50), percentile(pooled, 99)
        # Per repeat, as the served tails: pooled, the machine's drift between repeats would widen it.
        each = [percentile(calls, 99) / percentile(calls, 50) for calls in spread]
        checks["spread"] = (
            f"{ms(p99)} / {ms(p50)} ms pooled ({len(pooled)} calls); per repeat:"
            f" {', '.join(f'{ratio:.2f}' for ratio in each)} = **{statistics.median(each):.2f}**",
            None,
        )
    eighty = open_run_at(results["open"], workload, 0.8)
    if eighty and c1:
        ratio = eighty["p99_s"] / c1["p50_s"]
        checks["open80"] = (
            f"{ms(eighty['p99_s'])} / {ms(c1['p50_s'])} ms = **{ratio:.2f}** ({eighty['offered_rate']:.0f}/s)",
            ratio <= 4,
        )
    if c32 and c64:
        ratio = c64["throughput"] / c32["throughput"]
        checks["c64"] = (f"{c64['throughput']:.0f} vs {c32['throughput']:.0f} req/s = **{ratio:.2f}**", ratio >= 1.0)
    return _unless_answers_failed(results, workload, checks)


# The closed-loop concurrencies each target reads: a failed answer there is counted in its
# throughput and its percentiles (wrk times every response), so the target cannot be met.
_TARGET_RUNS: Final = {
    "ceiling": (32,),
    "forward_bound": (32,),
    "tail32": (32,),
    "tail64": (64,),
    "c1": (1,),
    "c64": (32, 64),
    "open80": (1,),
}


def _unless_answers_failed(results: Results, workload: str, checks: dict[str, Check]) -> dict[str, Check]:
    """A target whose runs had answers other than 2xx, or connection errors, is not met, and says why."""
    eighty = open_run_at(results["open"], workload, 0.8)
    for name, concurrencies in _TARGET_RUNS.items():
        if name not in checks:
            continue
        runs = [run for c in concurrencies for run in runs_of(results, "batched", workload, c)]
        failed = sum(int(run.get("non_2xx", 0) + run.get("errors", 0)) for run in runs)
        if name == "open80" and eighty is not None:
            failed += int(eighty.get("other_status", 0) + eighty.get("errors", 0))
        if failed:
            text, met = checks[name]
            checks[name] = (f"{text}; {failed} answers not 2xx or failed", None if met is None else False)
    return checks


def open_run_at(open_runs: Sequence[Mapping[str, Any]], workload: str, fraction: float) -> Mapping[str, Any] | None:
    """The open-loop run of `workload` at `fraction` of saturation, if there was one (results from
    before the runs named their workload were all the mix's)."""
    return next(
        (r for r in open_runs if r.get("workload", "mixed") == workload and abs(r["fraction"] - fraction) < 1e-9),
        None,
    )


def by_picture_section(open_runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The mix's open loop at 80 % of saturation, its 200s by picture: where the mix's p99 comes from."""
    run = open_run_at(open_runs, "mixed", 0.8)
    if run is None or not run.get("by_picture"):
        return []
    pictures = run["by_picture"]
    answered = sum(cell["count"] for cell in pictures.values())
    slowest = max(pictures, key=lambda name: pictures[name]["p50_s"])
    rows = [
        (name, cell["count"], f"{100 * cell['count'] / answered:.1f}%", ms(cell["p50_s"]), ms(cell["p99_s"]))
        for name, cell in sorted(pictures.items(), key=lambda item: item[1]["p50_s"])
    ]
    return [
        "### The mix at 80 % of saturation, by picture",
        "",
        *_table(("picture", "200s", "share", "p50 ms", "p99 ms"), rows),
        "",
        f"The whole mix's p99 ({ms(run['p99_s'])} ms) falls among its slowest pictures whenever they are more "
        f"than 1 % of the answers: here {slowest}, {100 * pictures[slowest]['count'] / answered:.1f}%.",
        "",
    ]


def targets(results: Results) -> list[tuple[str, ...]]:
    """(target, mixed, uniform, goal, met) rows."""
    per = {workload: _per_workload(results, workload) for workload in WORKLOADS}
    best = {w: results["ceilings"][w]["best_batch"] for w in WORKLOADS if w in results["ceilings"]}
    rows: list[tuple[str, ...]] = []

    def add(key: str, label: str, goal: str) -> None:
        values = [per[w].get(key) for w in WORKLOADS]
        if not any(values):
            return
        met = " / ".join("–" if v is None or v[1] is None else verdict(v[1]) for v in values)
        rows.append((label, *[v[0] if v else "–" for v in values], goal, met))

    add(
        "ceiling",
        "throughput at c=32 / in-process ceiling (preprocessing + forward at the best batch size: "
        + ", ".join(f"{w} {b}" for w, b in best.items())
        + ")",
        ">= 0.95",
    )
    add(
        "forward_bound",
        "throughput at c=32 / the same in-process runs' forward time alone (collation and the model's calls, "
        "the device's own bound: the service preprocesses beside the forward pass, the serial ceiling cannot)",
        "(reported)",
    )
    add("tail32", "p99 / p50 at c=32", "<= 1.25")
    add("tail64", "p99 / p50 at c=64", "<= 1.25")
    spread_s = results.get("plan", {}).get("spread_s", 0)
    add(
        "spread",
        "the machine's own spread: the model alone in-process, one batch of the best size, its inputs unchanged, "
        f"back to back for {spread_s:.1f} s before each repeat: p99 / p50 of its calls",
        "(reported)",
    )
    in_order = any(results["ceilings"].get(w, {}).get("batch1_in_order_medians_s") for w in WORKLOADS)
    add(
        "c1",
        "median at c=1 minus the in-process batch-1 cost (the workload's median request"
        + ("; each request once, in the clients' order, preprocessing + forward)" if in_order else ")"),
        "<= 1.0 ms",
    )
    add("c64", "throughput at c=64 against c=32", ">= 1.0 (no collapse)")
    add("open80", "open loop at 80 % of saturation: p99 / c=1 median", "<= 4")

    def single(label: str, measured: str, goal: str, met: bool | None) -> None:
        rows.append((label, measured, "–", goal, "–" if met is None else verdict(met)))

    b32, u32 = cell(results, "batched", "mixed", 32), cell(results, "unbatched", "mixed", 32)
    if b32 and u32:
        single(
            "batching on / off, throughput at c=32",
            f"{b32['throughput']:.0f} / {u32['throughput']:.0f} req/s = "
            f"**{b32['throughput'] / u32['throughput']:.2f}x**",
            "(reported)",
            None,
        )
    overload = overload_run(results["open"])
    if overload:
        single(*overload_row(overload, results["plan"]["open_s"]), "(reported)", None)
    ready = [s["ready_s"] for s in results["starts"] if s["server"] == "batched"]
    if ready:
        median = statistics.median(ready)
        single(
            f"time from process start to ready (median of {len(ready)})", f"**{median:.2f} s**", "<= 5 s", median <= 5
        )
    memory = results["memory"]
    if memory:
        growth = memory["growth_after_warmup"]
        single(
            f"resident memory growth after warm-up, {memory['requests']:,} requests ({memory['bad']:,} bad)",
            f"**{growth / 2**20:+.1f} MiB** ({memory['rss_warm'] / 2**20:.0f} -> {memory['rss_end'] / 2**20:.0f} MiB)",
            "flat",
            abs(growth) <= 16 * 2**20,
        )
    return rows


# -- the report ------------------------------------------------------------------------------------


def overload_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The open-loop run whose requests carried a deadline (the overload with deadlines), if any."""
    return next((r for r in runs if r.get("deadline_ms")), None)


def overload_sentence(runs: Sequence[dict[str, Any]]) -> str:
    overload = overload_run(runs)
    if overload is None:
        return ""
    return (
        f"{overload['workload']}: the uniform workload again, at {overload['fraction']:g} times its saturation, every"
        f" request allowing {overload['deadline_ms']} ms (X-Request-Timeout-Ms); the service refuses early what it"
        " cannot answer in time. "
    )


def overload_row(run: dict[str, Any], seconds: float) -> tuple[str, str]:
    """The goodput under overload with deadlines: (label, measured) for the targets table."""
    saturation = run["offered_rate"] / run["fraction"]
    within = run["within_deadline"] / seconds
    label = (
        f"open loop at {run['fraction']:g} x saturation (uniform), every request with a {run['deadline_ms']} ms"
        " deadline: answers within it (the generator's clock)"
    )
    measured = (
        f"**{within:.0f}/s** = {within / saturation:.2f} of saturation; {_share(run['within_deadline'], run['ok'])}"
        f" of the 200s within it; {_share(run['shed'], run['sent'])} refused with 429"
    )
    return label, measured


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]
    return lines


def _median_stage(runs: Sequence[dict[str, Any]], name: str) -> float:
    values = [r["stages"][name] for r in runs if r["stages"] and name in r["stages"]]
    return statistics.median(values) if values else math.nan


def write_report(results: Results, out: Path) -> Path:
    plots = make_plots(results, out)
    env, model, settings, plan = results["environment"], results["model"], results["settings"], results["plan"]
    lines = ["# fusionserve benchmark", ""]
    busy = contended(results)
    if busy:
        lines += [
            f"> **Contended run:** {busy}. Absolute numbers are lower and noisier than on an idle machine; "
            "the side-by-side ratios (served against in-process, batched against unbatched) are the "
            "meaningful part, since both sides of each ratio ran under the same load.",
            "",
        ]
    lines += [
        f"{env['date']} · model `{model['name']}` {model['version']} ({model['source']}) · "
        f"{env['cores']} cores · closed loop by {settings['generator']} · wall time {results['wall_s']:.0f} s",
        "",
        "Two workloads: the **realistic mix** (ShapesQA scenes of 64 to 512 px, 1024x768 and 12-megapixel "
        "photos, English and Chinese texts, /predict and /embed) and a **uniform** one (/predict with the "
        "scenes alone), which shows what the service does when requests cost about the same.",
        "",
        "## Targets",
        "",
    ]
    lines += _table(("target", *WORKLOADS.values(), "goal", "met"), targets(results))
    lines += ["", "Medians over repeats; each ratio's two sides were measured in the same run.", ""]
    if any(ceiling.get("spread_calls_s") for ceiling in results["ceilings"].values()):
        lines += [
            "The machine's own spread is what a served tail rides on: the same forward pass with the same "
            "inputs, nothing else running, took that much longer at its p99 than at its median. A served "
            "p99 / p50 near it is as steady as this machine allows.",
            "",
        ]

    lines += ["## Closed loop", ""]
    rows = []
    for server, workload, concurrency in cell_keys(results):
        found = cell(results, server, workload, concurrency)
        assert found is not None
        runs = runs_of(results, server, workload, concurrency)
        rows.append(
            (
                server,
                workload,
                concurrency,
                f"{found['throughput']:.1f} ({found['throughput_min']:.0f}–{found['throughput_max']:.0f})",
                ms(found["p50_s"]),
                ms(found["p90_s"]),
                ms(found["p99_s"]),
                ms(found["p999_s"]),
                f"{_median_stage(runs, 'mean_batch'):.1f}",
                int(found["non_2xx"] + found["errors"]),
                f"{found['server_cpu_per_request_s'] * 1e3:.2f}",
                f"{found.get('foreign_cpu_max', math.nan):.2f}",
            )
        )
    lines += _table(
        (
            "service",
            "workload",
            "concurrency",
            "req/s median (min–max)",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "mean batch",
            "non-2xx + errors",
            "server CPU ms/req",
            "foreign CPU (cores, max)",
        ),
        rows,
    )
    lines += [
        "",
        "Foreign CPU: how many cores other processes kept busy during the run, on average (all CPU time on "
        "the machine, from /proc/stat, less the service's and the load generator's).",
    ]
    lines += ["", f"![throughput]({plots['throughput']})", ""]

    lines += ["## In-process ceilings (no HTTP, one thread, same model and thread count)", ""]
    ceiling_rows = []
    for workload in WORKLOADS:
        ceilings = results["ceilings"].get(workload)
        if not ceilings:
            continue
        for batch in sorted(int(b) for b in ceilings["pipeline_rate"]):
            rates = ceilings["pipeline_rate"][str(batch)]
            ceiling_rows.append(
                (
                    WORKLOADS[workload],
                    f"preprocessing + forward, batch {batch}"
                    + (" (**best**)" if batch == ceilings["best_batch"] and batch != 1 else ""),
                    f"{statistics.median(rates):.1f}",
                    ", ".join(f"{r:.0f}" for r in rates),
                    f"{1 / ceilings['predicted_per_item_s'][str(batch)]:.0f}",
                )
            )
    lines += _table(
        ("workload", "measured serial pipeline", "items/s (median)", "repeats", "predicted from the parts"),
        ceiling_rows,
    )
    mixed = results["ceilings"]["mixed"]
    lines += [
        "",
        "Candidate batch sizes come from the prediction (preprocessing plus the share-weighted forward time per "
        "item of each lane, on fixed batches) and 4, 8, 16 and the maximum; each runs once over the whole "
        "rotation"
        + contender_sentence(results["ceilings"])
        + ", measured again with batch 1"
        + recheck_sentence(mixed)
        + " Batch-1 cost per request of the mix, preprocessing + forward"
        + (", each request with its own image and text" if "batch1_cost_medians_s" in mixed else "")
        + f": median {ms(mixed['batch1_cost_median_s'])} ms, mean {ms(mixed['batch1_cost_mean_s'])} ms"
        + (" (the first measurement)" if mixed.get("rechecks") else "")
        + "; "
        f"preprocessing alone: mean {ms(mixed['preprocess_mean_s'])} ms, median {ms(mixed['preprocess_median_s'])} ms.",
        "",
        "Every batch here runs as the service runs it: texts of mixed lengths in groups of similar length when that "
        "saves more padded tokens than a call costs (measured as the service does at startup: "
        + (", ".join(f"{lane} {cost:.0f}" for lane, cost in mixed.get("call_cost_tokens", {}).items()) or "none")
        + " tokens per call).",
        "",
    ]
    forward = mixed["forward_s"]
    sizes = [int(s) for s in mixed["batch_sizes"]]
    shown = [s for s in sizes if s in (1, 2, 4, 8, 16, 24, 32) or s == max(sizes)]
    lines += _table(
        ("forward ms per batch (per item)", *[f"B={s}" for s in shown]),
        [
            (lane, *[f"{forward[lane][str(s)] * 1e3:.2f} ({forward[lane][str(s)] * 1e3 / s:.2f})" for s in shown])
            for lane in forward
        ],
    )
    lines += [
        "",
        "Preprocessing (decode_image + tokenize) by picture, median ms: "
        + ", ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in mixed["preprocess_by_picture"].items()),
        "",
        f"![forward]({plots['forward']})",
        "",
    ]

    lines += ["## Open loop (Poisson arrivals, latency from the intended send time)", ""]
    lines += _table(
        (
            "workload",
            "x saturation",
            "offered/s",
            "200s/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "429",
            "other non-200",
            "unanswered",
            "send lag p99 ms",
            "mean batch",
            "foreign CPU",
        ),
        [
            (
                r.get("workload", "mixed"),
                f"{r['fraction']:.2f}",
                f"{r['offered_rate']:.1f}",
                f"{r['ok_per_s']:.1f}",
                ms(r["p50_s"]),
                ms(r["p90_s"]),
                ms(r["p99_s"]),
                ms(r["p999_s"]),
                r["shed"],
                r["other_status"] + r["errors"],
                r["unanswered"],
                ms(r["send_lag_p99_s"]),
                f"{r['stages'].get('mean_batch', math.nan):.1f}",
                f"{r.get('foreign_cpu', math.nan):.2f}",
            )
            for r in results["open"]
        ],
    )
    lines += [
        "",
        "Saturation is the best closed-loop throughput of the batched service on the workload in this run; the "
        "mix is swept, the uniform workload runs at 80 %. "
        + overload_sentence(results["open"])
        + "Percentiles are over the 200 answers, with unanswered requests counted as infinitely late; 429s "
        "(shed at admission) are counted, not timed. Send lag is how late the generator itself sent."
        + connection_error_sentence(results["open"]),
        "",
        f"![open loop]({plots['open']})",
        "",
    ]
    lines += by_picture_section(results["open"])

    lines += [
        "## Where the time goes",
        "",
        "Served, per request, from the service's own histograms (/metrics, differences over each run, medians "
        "over the repeats). 'device' is the whole batch an item ran in; 'other' is the rest of the end-to-end "
        "time: HTTP parsing, reading the body, the event loop, writing the answer.",
        "",
    ]
    stage_rows = []
    for server, workload, concurrency in cell_keys(results):
        runs = runs_of(results, server, workload, concurrency)
        if any(r["stages"] for r in runs):
            stage_rows.append(
                (
                    server,
                    workload,
                    concurrency,
                    ms(_median_stage(runs, "e2e")),
                    *[ms(_median_stage(runs, name)) for name, _ in STAGES],
                )
            )
    lines += _table(
        ("service", "workload", "concurrency", "end to end ms", *[f"{s} ms" for _, s in STAGES]), stage_rows
    )
    tail_rows = []
    for server, workload, concurrency in cell_keys(results):
        runs = runs_of(results, server, workload, concurrency)
        if any(r["stages"] for r in runs):
            tail_rows.append(
                (
                    server,
                    workload,
                    concurrency,
                    *[ms(_median_stage(runs, f"{name}_p99")) for name in ("e2e", "decode", "queue", "device")],
                )
            )
    lines += [
        "",
        "The same stages' p99, estimated from the histogram buckets (linear within a bucket, as Prometheus' "
        "histogram_quantile; the batch column is per batch):",
        "",
    ]
    lines += _table(
        ("service", "workload", "concurrency", "end to end p99 ms", "decode p99 ms", "queue p99 ms", "batch p99 ms"),
        tail_rows,
    )
    padding_rows = [
        (
            server,
            workload,
            concurrency,
            f"{_median_stage(runs, 'mean_batch'):.1f}",
            f"{_median_stage(runs, 'calls_per_batch'):.2f}",
            f"{_median_stage(runs, 'padding_share') * 100:.0f}%",
        )
        for server, workload, concurrency in cell_keys(results)
        if (runs := runs_of(results, server, workload, concurrency)) and any(r["stages"] for r in runs)
    ]
    lines += [
        "",
        "Text batches (fuse and text lanes): the forward calls each ran as (texts of similar length together) "
        "and the share of the text tokens those calls ran that was padding:",
        "",
    ]
    lines += _table(
        ("service", "workload", "concurrency", "mean batch", "calls per text batch", "padding"), padding_rows
    )
    lines += [
        "",
        "In-process, each step of the service's own code on one thread, mean per request of the mix (no HTTP, "
        "no contention between threads):",
        "",
    ]
    lines += _table(("step", "ms per request"), [(k, f"{v * 1e3:.3f}") for k, v in mixed["stages_s"].items()])
    in_process_total = sum(mixed["stages_s"].values())
    b32 = cell(results, "batched", "mixed", 32)
    if b32:
        lines += [
            "",
            f"Sum of the steps: {in_process_total * 1e3:.2f} ms of CPU per request. The batched service used "
            f"{b32['server_cpu_per_request_s'] * 1e3:.2f} ms of CPU (all its threads) per request at c=32; the "
            f"difference, {(b32['server_cpu_per_request_s'] - in_process_total) * 1e3:.2f} ms, is HTTP, ASGI and "
            "the framework, thread hand-offs and metrics.",
        ]
    floor = results.get("floor")
    if floor:
        lines += [
            "",
            f"The framework's floor, GET /healthz through the same service at c=8: {floor['throughput']:.0f} req/s, "
            f"{floor['server_cpu_per_request_s'] * 1e3:.3f} ms of CPU per request, median {ms(floor['p50_s'])} ms.",
        ]
    lines += ["", f"![stages]({plots['stages']})", ""]

    lines += ["## Batch sizes (batched service, whole run)", ""]
    overall = results["overall_batches"]
    total_batches = sum(overall.values()) or 1
    lines += _table(
        ("batch size", *[_bucket_label(le, list(overall)) for le in overall]),
        [("share of batches", *[f"{count / total_batches:.0%}" for count in overall.values()])],
    )
    lines += ["", f"![batches]({plots['batches']})", ""]

    memory = results["memory"]
    if memory:
        lines += [
            "## Memory",
            "",
            f"{memory['requests']:,} requests (planned {memory['planned']:,}) in {memory['seconds']:.0f} s at "
            f"concurrency {plan['memory_concurrency']}, {memory['bad']:,} of them refused with 4xx (statuses "
            f"{memory['statuses']}; answers with another status than expected: {memory['unexpected_status']}). "
            f"Resident memory: {memory['rss_start'] / 2**20:.1f} MiB at the start, {memory['rss_warm'] / 2**20:.1f} "
            f"MiB after {memory['rss_warm_at']:,} requests (warm), {memory['rss_end'] / 2**20:.1f} MiB at the end, "
            f"peak {memory['rss_peak'] / 2**20:.1f} MiB: growth after warm-up "
            f"**{memory['growth_after_warmup'] / 2**20:+.1f} MiB**. At ready: batched "
            f"{results['rss_ready']['batched'] / 2**20:.0f} MiB, "
            f"unbatched {results['rss_ready']['unbatched'] / 2**20:.0f} MiB.",
            "",
            f"![memory]({plots['memory']})",
            "",
        ]

    lines += ["## Time to ready", ""]
    lines += _table(
        (
            "service",
            "process start to /readyz 200 (s)",
            "load",
            "warmup",
            "call cost",
            "selfcheck",
            "total inside",
            "major page faults",
            "read from storage (MiB)",
        ),
        [
            (
                s["server"],
                f"{s['ready_s']:.2f}",
                *[f"{s['phases'].get(p, math.nan):.2f}" for p in ("load", "warmup", "callcost", "selfcheck", "total")],
                f"{s['major_faults']:,}" if "major_faults" in s else "–",
                f"{s['read_bytes'] / 2**20:.0f}" if "read_bytes" in s else "–",
            )
            for s in results["starts"]
        ],
    )
    lines += [
        "",
        "The first column minus 'total inside' is the interpreter's start and the imports. The last two say "
        "what the process had to read from storage by then: near zero when torch's libraries were in the page "
        "cache; a start after the cache dropped them spends its extra time waiting for the disk.",
        "",
    ]

    lines += ["## Load generator cost", ""]
    gen_rows = []
    for server, workload, concurrency in cell_keys(results):
        found = cell(results, server, workload, concurrency)
        assert found is not None
        gen, serv = found["generator_cpu_per_request_s"], found["server_cpu_per_request_s"]
        gen_rows.append(
            (f"closed {server}/{workload}/{concurrency}", f"{gen * 1e3:.3f}", f"{serv * 1e3:.3f}", _share(gen, serv))
        )
    for r in results["open"]:
        count = max(1, r["answered"])
        gen, serv = r["generator_cpu_s"] / count, r["server_cpu_s"] / count
        label = f"open {r.get('workload', 'mixed')} {r['fraction']:.2f}"
        gen_rows.append((label, f"{gen * 1e3:.3f}", f"{serv * 1e3:.3f}", _share(gen, serv)))
    lines += _table(("run", "generator CPU ms/req", "server CPU ms/req", "generator / server"), gen_rows)
    lines += [
        "",
        f"Closed loop: {settings['generator']} with one thread. Open loop and memory: bench.loadgen (asyncio on "
        "uvloop, raw sockets, pre-built requests) in the harness process.",
        "",
    ]

    lines += ["## Machine, versions, settings", ""]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines += [
        f"- CPU: {env['cpu']}, {env['cores']} cores usable; memory {env['memory']}; kernel {env['kernel']}",
        f"- load average before {_load(env['load_average_before'])}, after {_load(env['load_average_after'])}; "
        f"a training process running: before {'yes' if env['trainer_before'] else 'no'}, "
        f"after {'yes' if env['trainer_after'] else 'no'}",
        f"- Python {env['python']}; {versions}; wrk: {env['wrk']}",
        f"- commit {env['commit']}",
        f"- model: `{model['path']}`, {model['name']} {model['version']}, sha256 {model['sha256'][:16]}…, image "
        f"{model['image_size'][0]}x{model['image_size'][1]}, max text {model['max_text_length']} bytes, "
        f"{model['labels']} labels, embedding {model['embedding_dim']}",
        f"- model config: `{json.dumps(model['config'], sort_keys=True)}`",
        f"- service: `python -m app {' '.join(settings['server_args'])}` → {settings['threads']} intra-op "
        f"thread(s), {settings['decode_workers']} decode workers at nice +{settings.get('decode_nice', 0)}, "
        f"graph {graph_description(settings)}, max batch {settings['max_batch_size']}, max wait "
        f"{settings['max_wait_ms']} ms, max queue {settings['max_queue']}{decode_and_lookahead(settings)}; "
        f"baseline adds `{' '.join(settings['unbatched_args'])}`",
        f"- plan: budget {plan['budget_s']:.0f} s; closed loop {plan['run_s']:.1f} s per run x {plan['repeats']} "
        f"repeats; open loop {plan['open_s']:.1f} s per rate (+ up to {plan['drain_s']:.1f} s drain); in-process "
        f"{plan['inprocess_repeats']} repeats, pipeline {plan['pipeline_s']:.1f} s x {plan['pipeline_repeats']}",
        "",
        "### Payloads",
        "",
    ]
    for workload, mix in results["mix"].items():
        counts, sizes = mix["counts"], mix["bytes"]
        pictures = ", ".join(
            f"{k} {v}" + (f" ({sizes[k] / 1024:.0f} KiB)" if k in sizes else "") for k, v in counts["picture"].items()
        )
        lines += [
            f"- {WORKLOADS.get(workload, workload)}: {sum(counts['route'].values())} requests in rotation: "
            + ", ".join(f"{k} {v}" for k, v in counts["route"].items())
            + f"; pictures: {pictures}; texts: "
            + ", ".join(f"{k} {v}" for k, v in counts["lang"].items()),
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def _load(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def _bucket_label(le: str, all_le: Sequence[str]) -> str:
    upper = float(le)
    lower = max((float(k) for k in all_le if float(k) < upper), default=0.0)
    return f"{int(upper)}" if upper - lower <= 1 else f"{int(lower) + 1}–{int(upper)}"


# -- plots -----------------------------------------------------------------------------------------


def make_plots(results: Results, out: Path) -> dict[str, str]:
    makers: dict[str, tuple[str, Callable[[Results, Path], None]]] = {
        "throughput": ("throughput.png", _throughput),
        "open": ("open_loop.png", _open),
        "stages": ("stages.png", _stages),
        "batches": ("batches.png", _batches),
        "forward": ("forward.png", _forward),
        "memory": ("memory.png", _memory),
    }
    for name, maker in makers.values():
        maker(results, out / name)
    return {key: name for key, (name, _) in makers.items()}


def _save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _throughput(results: Results, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    series = (
        ("batched", "mixed", "tab:blue", "o"),
        ("unbatched", "mixed", "tab:orange", "o"),
        ("batched", "scenes", "tab:green", "s"),
    )
    for server, workload, color, marker in series:
        keys = [k for k in cell_keys(results) if k[0] == server and k[1] == workload]
        if not keys:
            continue
        cells = [cell(results, *k) for k in keys]
        xs = [k[2] for k in keys]
        ys = [c["throughput"] for c in cells if c]
        low = [y - c["throughput_min"] for y, c in zip(ys, cells, strict=True) if c]
        high = [c["throughput_max"] - y for y, c in zip(ys, cells, strict=True) if c]
        axes.errorbar(xs, ys, yerr=[low, high], marker=marker, color=color, capsize=3, label=f"{server}, {workload}")
    for workload, color in (("mixed", "tab:blue"), ("scenes", "tab:green")):
        if workload in results["ceilings"]:
            best = results["ceilings"][workload]["best_batch"]
            rate = ceiling_rate(results, workload)
            axes.axhline(rate, linestyle="--", color=color, alpha=0.6, label=f"ceiling, {workload}, batch {best}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("concurrency (closed loop)")
    axes.set_ylabel("requests/s (median, min–max)")
    axes.set_title("Throughput against concurrency")
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    _save(figure, path)


def _open(results: Results, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    runs = [r for r in results["open"] if r.get("workload", "mixed") == "mixed"]
    if runs:
        rates = [r["offered_rate"] for r in runs]

        def finite(value: float) -> float:
            return value if math.isfinite(value) else math.nan

        axes.plot(rates, [finite(r["p50_s"]) * 1e3 for r in runs], marker="o", label="p50")
        axes.plot(rates, [finite(r["p99_s"]) * 1e3 for r in runs], marker="s", label="p99")
        c1 = cell(results, "batched", "mixed", 1)
        if c1:
            axes.axhline(4 * c1["p50_s"] * 1e3, linestyle="--", color="gray", label="4 x c=1 median")
        saturation = rates[0] / runs[0]["fraction"]
        axes.axvline(saturation, linestyle=":", color="black", label=f"saturation {saturation:.0f}/s")
        axes.set_yscale("log")
    axes.set_xlabel("offered load (requests/s, Poisson arrivals)")
    axes.set_ylabel("latency, ms from the intended send time")
    axes.set_title("Latency against offered load (open loop, batched, realistic mix)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3, which="both")
    _save(figure, path)


def _stages(results: Results, path: Path) -> None:
    labels, values = [], []
    for server, workload, concurrency in cell_keys(results):
        runs = runs_of(results, server, workload, concurrency)
        if any(r["stages"] for r in runs):
            labels.append(f"{server[0].upper()}{workload[0]} {concurrency}")
            values.append([_median_stage(runs, name) * 1e3 for name, _ in STAGES])
    figure, axes = plt.subplots(figsize=(9, 4.5))
    bottom = [0.0] * len(labels)
    for index, (_, label) in enumerate(STAGES):
        heights = [v[index] for v in values]
        axes.bar(labels, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.set_ylabel("mean ms per request")
    axes.set_xlabel("service (B batched, U unbatched), workload (m mix, s scenes), concurrency")
    axes.set_title("Where a request's time goes (from /metrics)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3, axis="y")
    _save(figure, path)


def _batches(results: Results, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    keys = [k for k in cell_keys(results) if k[0] == "batched" and k[1] == "mixed"]
    width = 0.8 / max(1, len(keys))
    labels: list[str] = []
    for index, key in enumerate(keys):
        merged: dict[str, float] = {}
        for run in runs_of(results, *key):
            for le, count in run["batches"].items():
                merged[le] = merged.get(le, 0.0) + count
        buckets = sorted(merged, key=float)
        labels = [_bucket_label(le, buckets) for le in buckets]
        total = sum(merged.values()) or 1
        axes.bar(
            [i + index * width for i in range(len(buckets))],
            [merged[le] / total for le in buckets],
            width=width,
            label=f"c={key[2]}",
        )
    axes.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(labels))], labels)
    axes.set_xlabel("batch size")
    axes.set_ylabel("share of batches")
    axes.set_title("Batch sizes run (from /metrics; batched service, realistic mix)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3, axis="y")
    _save(figure, path)


def _forward(results: Results, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for lane, table in results["ceilings"]["mixed"]["forward_s"].items():
        sizes = sorted(int(s) for s in table)
        axes.plot(sizes, [table[str(s)] / s * 1e3 for s in sizes], marker=".", label=lane)
    axes.set_xlabel("batch size")
    axes.set_ylabel("forward ms per item")
    axes.set_title("In-process forward cost per item, by lane")
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    _save(figure, path)


def _memory(results: Results, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7.5, 3.8))
    samples = results["memory"].get("samples", []) if results["memory"] else []
    if samples:
        axes.plot([n for n, _ in samples], [rss / 2**20 for _, rss in samples], marker=".")
    axes.set_xlabel("requests answered (one in four bad)")
    axes.set_ylabel("resident memory (MiB)")
    axes.set_title("Resident memory under sustained load (batched service)")
    axes.grid(alpha=0.3)
    _save(figure, path)


def connection_error_sentence(runs: Sequence[dict[str, Any]]) -> str:
    """What the generator's connection errors were (counted in 'other non-200'), where any happened."""
    failed = [run for run in runs if run.get("errors")]
    if not failed:
        return ""
    parts = []
    for run in failed:
        kinds = run.get("error_kinds") or {"unrecorded": run["errors"]}
        described = ", ".join(f"{name} {count}" for name, count in sorted(kinds.items()))
        parts.append(f"{run.get('workload', 'mixed')} at {run['fraction']:.2f}: {described}")
    return " Connection errors (refused, reset or closed before the whole answer): " + "; ".join(parts) + "."


def contender_sentence(ceilings: dict[str, dict[str, Any]]) -> str:
    """How the ceiling's batch size was chosen among the candidates (results.json files written
    before the second round have no `contenders`: there the fastest single run chose)."""
    if not any("contenders" in ceiling for ceiling in ceilings.values()):
        return ", and the fastest is the ceiling's batch size"
    share = f"{max(ceiling.get('contender_share', 0.0) for ceiling in ceilings.values()):.0%}".replace("%", " %")
    rounds = "; ".join(
        f"{name}: {', '.join(str(size) for size in ceiling['contenders'])}"
        for name, ceiling in ceilings.items()
        if ceiling.get("contenders")
    )
    at_least = max(ceiling.get("min_contenders", 0) for ceiling in ceilings.values())
    chosen = (
        f"the {at_least} fastest and any within {share} of the fastest"
        if at_least
        else f"those within {share} of the fastest"
    )
    return (
        f", {chosen} once more, in turn ({rounds or 'none'}), and the one with the best median is the"
        " ceiling's batch size"
    )


def recheck_sentence(ceiling: dict[str, Any]) -> str:
    """How often the targets' in-process sides were measured again between the served runs."""
    rechecks = ceiling.get("rechecks", 0)
    if not rechecks:
        return "."
    medians = ", ".join(ms(value) for value in ceiling["batch1_cost_medians_s"])
    repeats = "the closed-loop repeat" if rechecks == 1 else f"each of the {rechecks} closed-loop repeats"
    in_order = ceiling.get("batch1_in_order_medians_s") or []
    each_once = (
        f"; each request once, in order, just before each concurrency-1 run: {', '.join(ms(v) for v in in_order)} ms"
        if in_order
        else ""
    )
    return (
        f"; it and the batch-1 cost were measured again before {repeats}, with the services idle (mix:"
        f" {medians} ms; the forward passes re-timed, each request's preprocessing time from the first"
        f" measurement{each_once}), and the targets compare each repeat's served figures with the measurement made just"
        " before them, since the machine's speed drifts during a run: the targets are the medians of those"
        " per-repeat ratios and differences, the tables' figures medians over all measurements."
    )


def decode_and_lookahead(settings: dict[str, Any]) -> str:
    """Where cheap requests decode under load, and how early the next batch is handed over (results
    from before these settings have neither)."""
    if "inline_decode_under_load" not in settings:
        return ""
    where = "on the event loop" if settings["inline_decode_under_load"] else "in the pool"
    return f", cheap requests decoded {where} under load, next batch handed over {settings['lookahead_ms']:g} ms early"


def graph_description(settings: dict[str, Any]) -> str:
    """Which graph the service ran, and the in-process ceilings' where it differs (a CUDA host
    serves the module as loaded, while the ceilings run on the CPU)."""
    served = settings.get("graph_optimized", False)
    ceilings = settings.get("ceiling_graph_optimized", served)
    name = {True: "frozen and optimized", False: "as loaded"}
    return name[served] + (f" (in-process ceilings: {name[ceilings]})" if ceilings != served else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description="Rebuild DIR/report.md and the plots from DIR/results.json."
    )
    parser.add_argument("folder", nargs="?", type=Path, default=Path(__file__).with_name("results"), metavar="DIR")
    folder = parser.parse_args(argv).folder
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    print(write_report(results, folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
