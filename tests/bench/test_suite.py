"""The benchmark suite end to end at tiny scale (two real services, a 5-second budget), so it cannot rot."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import loadgen, suite
from bench.inprocess import best_by_median, ceiling_batch, contenders_of
from bench.payloads import MixSpec, Payload, bad_requests, build_mix, memory_rotation
from bench.report import (
    connection_error_sentence,
    contender_sentence,
    decode_and_lookahead,
    graph_description,
    targets,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_MIX = MixSpec(slots=40, scenes_per_side=1, photo=(800, 600))


def test_the_mix_holds_its_proportions_and_fits_the_model() -> None:
    payloads = build_mix(MixSpec(slots=100, scenes_per_side=1, photo=(800, 600)), max_text_length=64)
    routes = [(p.route, p.kind) for p in payloads]
    assert routes.count(("/predict", "fuse")) == 60
    assert routes.count(("/embed", "fuse")) == 20
    assert routes.count(("/embed", "image")) == routes.count(("/embed", "text")) == 10
    assert {p.lang for p in payloads if p.text is not None} == {"en", "zh"}
    assert all(len(p.text.encode()) <= 64 for p in payloads if p.text is not None)
    # The photos' 2 and 6 slots of the 100, less those that drew a text-only /embed (no image): the
    # seed fixes which.
    assert [sum(p.image_name.startswith(name) for p in payloads) for name in ("photo-800x600", "photo-1024")] == [1, 6]
    assert {p.expect for p in payloads} == {200}
    rotation = memory_rotation(payloads, 64)
    assert [status != 200 for _, status in rotation] == ([False] * 3 + [True]) * 33 + [False]  # one in four is bad
    cases = bad_requests(payloads, 64)
    assert [status for _, status in rotation if status != 200] == [cases[i % len(cases)].expect for i in range(33)]


@pytest.mark.slow
def test_suite_runs_end_to_end_and_writes_the_report(tiny_package: Path, tmp_path: Path) -> None:
    report = suite.run(
        model=tiny_package,
        out=tmp_path,
        budget_s=5,
        concurrencies=(1, 4),
        memory_requests=200,
        mix=TINY_MIX,
        server_args=["--max-batch-size", "4"],
    )
    text = report.read_text(encoding="utf-8")
    for heading in ("## Targets", "## Closed loop", "## In-process ceilings", "## Open loop", "## Where the time goes"):
        assert heading in text
    for plot in ("throughput", "open_loop", "stages", "batches", "forward", "memory"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 1000
    results = json.loads((tmp_path / "results.json").read_text())
    expected = {(server, "mixed", c) for server in ("batched", "unbatched") for c in (1, 4)}
    expected |= {("batched", "scenes", c) for c in (1, 4)}
    assert {(r["server"], r["workload"], r["concurrency"]) for r in results["closed"]} == expected
    assert all(r["non_2xx"] == 0 and r["errors"] == 0 and r["requests"] > 0 for r in results["closed"])
    assert all(r["unanswered"] == 0 and r["ok"] > 0 for r in results["open"])
    assert [r["workload"] for r in results["open"]] == ["mixed", "mixed", "scenes", "scenes-100ms"]
    eighty = next(r for r in results["open"] if r["workload"] == "mixed" and r["fraction"] == 0.8)
    assert sum(cell["count"] for cell in eighty["by_picture"].values()) == eighty["ok"]
    assert "### The mix at 80 % of saturation, by picture" in text
    overload = results["open"][-1]  # twice the scenes' saturation, every request allowing 100 ms
    assert (overload["fraction"], overload["deadline_ms"]) == (2.0, 100)
    assert 0 <= overload["within_deadline"] <= overload["ok"] and overload["within_deadline_server"] >= 0
    assert "x saturation (uniform), every request with a 100 ms deadline: answers within it" in text
    assert "scenes-100ms: the uniform workload again, at 2 times its saturation" in text
    memory = results["memory"]
    # Every bad request got exactly the status the service documents for it.
    assert memory["requests"] > 0 and memory["unexpected_status"] == 0 and memory["bad"] > 0
    for workload in ("mixed", "scenes"):
        assert results["ceilings"][workload]["pipeline_rate"]["1"][0] > 0
        # Measured again before the one closed-loop repeat: the targets use the medians over both.
        ceiling = results["ceilings"][workload]
        assert ceiling["rechecks"] == 1 and len(ceiling["batch1_cost_medians_s"]) == 2
        assert ceiling["batch1_cost_median_s"] == statistics.median(ceiling["batch1_cost_medians_s"])
        # The in-order batch-1 cost: first, then just before the batched c=1 run of the one repeat.
        assert len(ceiling["batch1_in_order_medians_s"]) == 2 and min(ceiling["batch1_in_order_medians_s"]) > 0
        # Once in the first round, once more if it was a contender, once in the recheck.
        best, contenders = ceiling["best_batch"], ceiling["contenders"]
        assert len(ceiling["pipeline_rate"][str(best)]) == 2 + (best in contenders)
        # The same runs' forward time alone, one figure per pipeline run, each above the serial rate.
        pipeline, forward = ceiling["pipeline_rate"][str(best)], ceiling["forward_rate"][str(best)]
        assert len(forward) == len(pipeline) and all(f > p for f, p in zip(forward, pipeline, strict=True))
        assert all(len(ceiling["pipeline_rate"][str(size)]) >= 2 for size in contenders)
        # The ceilings split batches by text length as the service does, with the cost it would
        # measure: text lanes only, each a positive cost or left out where timing noise defeated the
        # fit (the service then does not split that lane either: `fit_call_cost` gives infinity).
        costs = results["ceilings"][workload]["call_cost_tokens"]
        assert set(costs) <= {"fuse", "text"} and all(0 < cost < math.inf for cost in costs.values())
    assert "(in-process each call repeated back to back: " in text
    # The machine's spread, measured once before the repeat, on the uniform workload alone.
    assert results["ceilings"]["mixed"]["spread_calls_s"] == []
    (spread,) = results["ceilings"]["scenes"]["spread_calls_s"]
    assert spread and all(seconds > 0 for seconds in spread)
    assert "the machine's own spread: the model alone in-process" in text
    assert "measured again before the closed-loop repeat," in text
    assert "tokens per call)." in text
    assert "of the fastest once more, in turn (" in text
    batched = [r for r in results["closed"] if r["server"] == "batched" and r["stages"]]
    assert batched and all(0 <= r["stages"]["padding_share"] < 1 for r in batched)
    assert all(r["stages"]["calls_per_batch"] >= 1 for r in batched)
    alone = [r["stages"] for r in batched if r["concurrency"] == 1 and r["workload"] == "mixed"]
    assert [(s["calls_per_batch"], s["padding_share"]) for s in alone] == [(1.0, 0.0)] * len(alone)  # one text a batch
    assert results["floor"]["throughput"] > 0
    assert [s["server"] for s in results["starts"]] == ["batched", "unbatched"]  # no extra starts in a short run
    assert all(s["ready_s"] > 0 and type(s["major_faults"]) is int and s["read_bytes"] >= 0 for s in results["starts"])
    assert "| major page faults | read from storage (MiB) |" in text
    # The ceilings ran the module the service serves: the tiny model's graph, frozen and optimized.
    assert results["settings"]["graph_optimized"] is True and "graph frozen and optimized" in text
    assert results["settings"]["ceiling_graph_optimized"] is True  # from the served /info, and in-process
    # The device-dependent defaults, as the service reports them: on this CPU, decoding on the loop.
    assert (results["settings"]["inline_decode_under_load"], results["settings"]["lookahead_ms"]) == (True, 2.0)
    assert "cheap requests decoded on the event loop under load, next batch handed over 2 ms early" in text


def test_results_from_before_the_device_dependent_defaults_describe_no_decoding() -> None:
    assert decode_and_lookahead({"max_queue": 256}) == ""
    pool = {"inline_decode_under_load": False, "lookahead_ms": 0.0}
    assert (
        decode_and_lookahead(pool)
        == ", cheap requests decoded in the pool under load, next batch handed over 0 ms early"
    )


def test_the_report_says_when_the_ceilings_ran_another_graph() -> None:
    # A CUDA host serves the module as loaded; the in-process ceilings run on the CPU, optimized.
    cuda = {"graph_optimized": False, "ceiling_graph_optimized": True}
    assert graph_description(cuda) == "as loaded (in-process ceilings: frozen and optimized)"
    assert graph_description({"graph_optimized": True, "ceiling_graph_optimized": True}) == "frozen and optimized"
    assert graph_description({}) == "as loaded"  # results from before the setting existed


def test_the_ceiling_batch_is_chosen_by_median_among_the_close_candidates() -> None:
    first = {4: 300.0, 8: 500.0, 16: 460.0, 32: 449.9, 64: 100.0}
    assert contenders_of(first, at_least=2) == [8, 16]  # 32 is just under 90 % of the fastest
    assert contenders_of(first) == [8, 16, 32]  # the three fastest, whatever their rates
    assert contenders_of({**first, 4: 455.0, 32: 452.0}) == [4, 8, 16, 32]  # and every size within 90 %
    # A first run far ahead of the rest (the machine's fast moment) still gets rivals measured again.
    assert contenders_of({8: 531.0, 16: 625.0, 32: 491.0, 4: 450.0}) == [8, 16, 32]
    assert contenders_of({8: 500.0}) == contenders_of({}) == []  # nothing to choose between
    # 8 led the first round by a fluke: 16's median over both rounds is higher.
    assert best_by_median({4: [300.0], 8: [500.0, 400.0], 16: [460.0, 470.0], 32: [449.9]}) == 16
    assert best_by_median({8: [5.0], 16: [5.0]}) == 8  # a tie goes to the smaller batch
    # The machine slowed between the rounds: 32, measured once in the first, is not a finalist.
    rates = {8: [500.0, 380.0], 16: [460.0, 400.0], 32: [445.0]}
    assert contenders_of({size: runs[0] for size, runs in rates.items()}, at_least=2) == [8, 16]
    assert (ceiling_batch(rates, [8, 16]), ceiling_batch(rates, [])) == (8, 32)


def test_the_report_says_how_the_ceiling_batch_was_chosen() -> None:
    ceilings: dict[str, dict[str, Any]] = {
        "mixed": {"contenders": [28, 32], "contender_share": 0.9},
        "scenes": {"contenders": []},
    }
    assert contender_sentence(ceilings) == (
        ", those within 90 % of the fastest once more, in turn (mixed: 28, 32), and the one with the best"
        " median is the ceiling's batch size"
    )  # results from before MIN_CONTENDERS
    ceilings["scenes"] = {"contenders": [8, 16, 32], "contender_share": 0.9, "min_contenders": 3}
    assert contender_sentence(ceilings) == (
        ", the 3 fastest and any within 90 % of the fastest once more, in turn (mixed: 28, 32; scenes: 8, 16,"
        " 32), and the one with the best median is the ceiling's batch size"
    )
    assert contender_sentence({"mixed": {}, "scenes": {}}) == ", and the fastest is the ceiling's batch size"


def test_the_targets_pair_each_repeat_with_the_measurement_just_before_it() -> None:
    """A ceiling that fell from 600 to 400 items/s during the run: each repeat's throughput over the
    ceiling measured before it is 0.9, 0.95 and 1.0, where medians over the whole run gave 0.86."""
    served, rechecked = [540.0, 475.0, 400.0], [600.0, 500.0, 400.0]
    c1_p50, costs = [0.005, 0.0045, 0.006], [0.0031, 0.0035, 0.0052]

    def run(concurrency: int, repeat: int) -> dict[str, Any]:
        throughput = served[repeat] if concurrency == 32 else 200.0
        p50 = c1_p50[repeat] if concurrency == 1 else 0.05
        return {
            "server": "batched",
            "workload": "mixed",
            "concurrency": concurrency,
            "repeat": repeat,
            "throughput": throughput,
            "p50_s": p50,
            "p99_s": 2 * p50,
        }

    closed = [run(c, r) for r in range(3) for c in (1, 32)]
    medians = {
        f"batched/mixed/{c}": run(c, 1)
        | {
            "throughput": statistics.median(served) if c == 32 else 200.0,
            "p50_s": statistics.median(c1_p50) if c == 1 else 0.05,
        }
        for c in (1, 32)
    }
    results: dict[str, Any] = {
        "closed": closed,
        "closed_medians": medians,
        "open": [],
        "starts": [],
        "memory": {},
        "ceilings": {
            "mixed": {
                "best_batch": 16,
                "pipeline_rate": {"16": [650.0, *rechecked]},
                "forward_rate": {"16": [900.0, 700.0, 600.0, 500.0]},
                "rechecks": 3,
                "batch1_cost_medians_s": [0.003, *costs],
                "batch1_cost_median_s": 0.0033,
            }
        },
    }
    rows = {row[0].split(" (")[0]: row[1] for row in targets(results)}
    assert rows["throughput at c=32 / in-process ceiling"] == (
        "475 / 550 req/s; per repeat, against the ceiling measured just before it: 0.90, 0.95, 1.00 = **0.95**"
    )
    assert rows["throughput at c=32 / the same in-process runs' forward time alone"] == (
        "475 / 650 req/s; per repeat, against the rate measured just before it: 0.77, 0.79, 0.80 = **0.79**"
    )
    assert rows["median at c=1 minus the in-process batch-1 cost"] == (
        "5.00 - 3.30 ms; per repeat, against the cost measured just before it: +1.90, +1.00, +0.80 = **+1.00 ms**"
    )
    # Each request once, in the clients' order: the c=1 target's side where measured, the back-to-back one beside it.
    results["ceilings"]["mixed"]["batch1_in_order_medians_s"] = [0.0035, 0.0037, 0.0034, 0.0054]
    rows = {row[0].split(" (")[0]: row[1] for row in targets(results)}
    assert rows["median at c=1 minus the in-process batch-1 cost"] == (
        "5.00 - 3.60 ms; per repeat, against the cost measured just before it: +1.30, +1.10, +0.60 = **+1.10 ms**"
        " (in-process each call repeated back to back: 3.30 ms)"
    )
    del results["ceilings"]["mixed"]["batch1_in_order_medians_s"]
    results["ceilings"]["mixed"]["rechecks"] = 0  # results from before the rechecks: whole-run medians
    rows = {row[0].split(" (")[0]: row[1] for row in targets(results)}
    assert rows["throughput at c=32 / in-process ceiling"] == "475 / 550 req/s = **0.86**"
    assert rows["median at c=1 minus the in-process batch-1 cost"] == "5.00 - 3.30 ms = **+1.70 ms**"


def scenes_c32_targets(closed: list[dict[str, Any]], median_cell: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The targets table's rows, by label, for batched scenes runs at c=32 alone."""
    results: dict[str, Any] = {
        "closed": closed,
        "closed_medians": {"batched/scenes/32": median_cell},
        "open": [],
        "starts": [],
        "memory": {},
        "ceilings": {"scenes": {"best_batch": 16, "pipeline_rate": {"16": [500.0]}}},
    }
    return {row[0].split(" (")[0]: row for row in targets(results)}


def test_the_tail_target_is_each_repeats_p99_over_its_own_p50() -> None:
    """Repeats with (p50, p99) of (50, 60), (40, 90) and (60, 66) ms: 1.20, 2.25 and 1.10, median
    1.20. The medians' ratio, 66 / 50 = 1.32, pairs one repeat's p99 with another's p50."""
    pairs = [(0.050, 0.060), (0.040, 0.090), (0.060, 0.066)]
    closed = [
        {"server": "batched", "workload": "scenes", "concurrency": 32, "repeat": repeat, "throughput": 500.0}
        | {"p50_s": p50, "p99_s": p99}
        for repeat, (p50, p99) in enumerate(pairs)
    ]
    rows = scenes_c32_targets(closed, closed[0] | {"p50_s": 0.050, "p99_s": 0.066})
    assert rows["p99 / p50 at c=32"][1:3] == ("–", "66.0 / 50.0 ms; per repeat: 1.20, 2.25, 1.10 = **1.20**")
    assert rows["p99 / p50 at c=32"][-1] == "– / yes"


def test_a_target_whose_runs_had_failed_answers_is_not_met() -> None:
    """wrk times every response: a run with 3 errors in it cannot meet a target, however fast."""
    run = {"server": "batched", "workload": "scenes", "concurrency": 32, "repeat": 0, "throughput": 500.0}
    run |= {"p50_s": 0.050, "p99_s": 0.055, "non_2xx": 2, "errors": 1}
    rows = scenes_c32_targets([run], run)
    assert rows["p99 / p50 at c=32"][2:] == (
        "55.0 / 50.0 ms = **1.10**; 3 answers not 2xx or failed",
        "<= 1.25",
        "– / **no**",
    )
    assert rows["throughput at c=32 / in-process ceiling"][-1] == "– / **no**"


def test_the_machines_spread_is_the_p99_over_the_p50_of_the_unchanged_calls_of_each_repeat() -> None:
    steady, shaky = [0.010] * 99 + [0.011], [0.010] * 90 + [0.016] * 10
    results: dict[str, Any] = {
        "closed": [],
        "closed_medians": {},
        "open": [],
        "starts": [],
        "memory": {},
        "plan": {"spread_s": 2.0},
        "ceilings": {"scenes": {"best_batch": 32, "rechecks": 2, "spread_calls_s": [steady, shaky]}},
    }
    (row,) = [row for row in targets(results) if row[0].startswith("the machine's own spread")]
    assert "back to back for 2.0 s before each repeat" in row[0]
    # Per repeat 1.00 and 1.60, median 1.30; pooled, the 198th fastest of 200 is one of the second
    # repeat's ten slow calls.
    expected = "16.0 / 10.0 ms pooled (200 calls); per repeat: 1.00, 1.60 = **1.30**"
    assert row[1:] == ("–", expected, "(reported)", "– / –")


def test_the_report_names_the_generators_connection_errors() -> None:
    runs: list[dict[str, Any]] = [
        {"workload": "mixed", "fraction": 0.5, "errors": 0, "error_kinds": {}},
        {
            "workload": "scenes",
            "fraction": 0.8,
            "errors": 2,
            "error_kinds": {"IncompleteReadError": 1, "ConnectionResetError": 1},
        },
        {"fraction": 1.1, "errors": 1},  # results.json from before the kinds were recorded
    ]
    assert connection_error_sentence(runs) == (
        " Connection errors (refused, reset or closed before the whole answer): scenes at 0.80:"
        " ConnectionResetError 1, IncompleteReadError 1; mixed at 1.10: unrecorded 1."
    )
    assert connection_error_sentence(runs[:1]) == ""


@pytest.mark.slow
def test_the_report_rebuilds_from_results_json_on_the_command_line(tmp_path: Path) -> None:
    shutil.copy(ROOT / "bench" / "results" / "example" / "results.json", tmp_path / "results.json")
    done = subprocess.run(
        [sys.executable, "-m", "bench.report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Targets" in text and "graph frozen and optimized" in text
    assert "measured again before each of the 3 closed-loop repeats" in text  # the example's rechecks
    assert (tmp_path / "throughput.png").stat().st_size > 1000


@pytest.mark.slow
def test_gpu_check_dry_run() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert any("PASS" in line for line in lines)
    columns = (
        "| service | concurrency | req/s | p50 ms | p99 ms | mean batch | non-200 | cores | event loop busy "
        "| device busy |"
    )
    header = lines.index(columns)
    rows = [line.split(" | ") for line in lines[header + 2 : -1]]
    assert [row[:2] for row in rows] == [
        ["| fp32", "1"],
        ["| fp32", "4"],
        ["| bf16", "1"],
        ["| bf16", "4"],
        ["| fp32, --lookahead-ms 2", "1"],
        ["| fp32, --lookahead-ms 2", "4"],
        ["| fp32, 2 processes", "1"],
        ["| fp32, 2 processes", "4"],
    ]
    assert all(row[6] == "0" for row in rows)  # every request answered 200
    assert all(0 < float(row[7]) and row[8].endswith("%") for row in rows)
    assert all(0 < float(row[9].removesuffix("% |")) <= 100 for row in rows)  # the device ran batches
    assert lines[-1].startswith("(") and lines[-1].endswith(" s)")


def _watched(stuck: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """A process that arms gpu_check's watchdog (0.3 s, then 0.3 s of grace) and then hangs."""
    code = f"import signal, time\nfrom bench.gpu_check import arm_watchdog\narm_watchdog(0.3, 0.3)\n{stuck}\n"
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - began


@pytest.mark.slow
def test_gpu_checks_watchdog_raises_overrun_past_any_except_exception_or_ends_with_a_traceback() -> None:
    # A wait Python can interrupt: Overrun, past any `except Exception` (main's `finally` then prints the table).
    done, seconds = _watched("try:\n    time.sleep(30)\nexcept Exception:\n    pass")
    assert done.returncode == 1 and seconds < 20
    assert "Overrun: still running 0 s after the start: stopped here" in done.stderr
    # A main thread no signal reaches (SIGALRM blocked, as inside a hung C call): faulthandler ends it.
    done, seconds = _watched("signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\ntime.sleep(30)")
    assert done.returncode == 1 and seconds < 20
    assert "Timeout (0:00:00" in done.stderr and "Overrun" not in done.stderr


def test_latencies_by_picture_count_only_the_200s_of_each_picture() -> None:
    payloads = [
        Payload("/predict", "fuse", b"jpeg", "scene-64", "q", "en"),
        Payload("/embed", "text", None, "", "t", "en"),
        Payload("/predict", "fuse", b"jpeg", "photo-12MP", "q", "en"),
    ]
    result = loadgen.RunResult("open")
    for latency, status, index in [(0.01, 200, 0), (0.03, 200, 0), (0.02, 429, 2), (0.2, 200, 2), (0.005, 200, 1)]:
        result.latencies.append(latency)
        result.statuses.append(status)
        result.indices.append(index)
    assert suite.latencies_by_picture(result, payloads) == {
        "photo-12MP": {"count": 1, "p50_s": 0.2, "p99_s": 0.2},
        "scene-64": {"count": 2, "p50_s": 0.01, "p99_s": 0.03},
        "text": {"count": 1, "p50_s": 0.005, "p99_s": 0.005},
    }
