"""Where the time to ready goes, and what a smaller warm-up would cost the first requests.

    python -m bench.startup_profile [--model DIR] [--max-batch-size 32]

1. the interpreter's start and the device process's imports (`python -c "import app.__main__,
   app.lifespan"`: the app, torch and the model's side; median of 3);
2. the service's own warm-up plan on the CPU (app.engine.Engine.warm_up_plan: the powers of two and
   the largest batch), every call timed, summed by lane;
3. in the same module: every batch size that warm-up left out, called for the first time, against
   the same call repeated: if the first call costs no more than a steady one, warming those sizes
   would buy nothing (before step 4, whose calls would warm the process-wide kernel caches);
4. in a fresh module: the warm-up at every batch size (what an accelerator runs), timed (a lower
   bound: step 3 has warmed the process-wide caches).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.server import ROOT
from bench.suite import resolve_model

# What `python -m app` imports before it serves (app.main alone does not import torch: a front-end
# process builds its app without the model's side).
IMPORTS = "import app.__main__"


def import_seconds(repeats: int = 3) -> float:
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, check=True)
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup_profile", description=__doc__)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from app.engine import Engine, WarmUp
    from app.items import Kind
    from app.lifespan import call_cost_rows, warmup_text_lengths

    torch.set_num_threads(args.threads)
    model, source = resolve_model(args.model)
    print(f"model {model} ({source}); {args.threads} intra-op thread(s)")
    print(f"interpreter + imports (python -c '{IMPORTS}'): {import_seconds():.2f} s")

    began = time.perf_counter()
    engine = Engine.load(model, torch.device("cpu"))
    print(f"load: {time.perf_counter() - began:.2f} s")
    lengths = warmup_text_lengths(engine.manifest.max_text_length)
    plan = engine.warm_up_plan(list(Kind), args.max_batch_size, lengths)
    by_lane: dict[str, float] = {}
    for step in plan:
        began = time.perf_counter()
        engine.warm_up(step)
        by_lane[step.kind.value] = by_lane.get(step.kind.value, 0.0) + time.perf_counter() - began
    print(
        f"warm-up as the service runs it: {len(plan)} calls, {sum(by_lane.values()):.2f} s ("
        + ", ".join(f"{k} {v:.2f} s" for k, v in by_lane.items())
        + ")"
    )

    began = time.perf_counter()
    rows = call_cost_rows(engine.device, args.max_batch_size)
    costs = {kind.value: engine.measure_call_cost(kind, lengths, rows) for kind in Kind if kind.needs_text}
    print(
        f"call cost as the service measures it: {time.perf_counter() - began:.2f} s ("
        + ", ".join(f"{k} {v:.0f} tokens" for k, v in costs.items())
        + ")"
    )

    warmed = {step.size for step in plan}
    ratios = []
    worst = (0.0, 0, "")
    for kind in Kind:
        for size in range(1, args.max_batch_size + 1):
            if size in warmed:
                continue
            step = WarmUp(kind, size, lengths[len(lengths) // 2])
            first = _timed(engine, step)
            steady = statistics.median(_timed(engine, step) for _ in range(3))
            ratios.append(first / steady)
            if first / steady > worst[0]:
                worst = (first / steady, size, kind.value)
    print(
        f"first call at an unwarmed batch size / the same call repeated: median {statistics.median(ratios):.2f}, "
        f"max {worst[0]:.2f} ({worst[2]} at batch {worst[1]}),"
        f" over {len(ratios)} calls (each kind, each size left out)"
    )
    fresh = Engine.load(model, torch.device("cpu"))
    full_plan = fresh.warm_up_plan(list(Kind), args.max_batch_size, lengths, every_size=True)
    began = time.perf_counter()
    for step in full_plan:
        fresh.warm_up(step)
    seconds = time.perf_counter() - began
    print(f"warm-up at every batch size (as on an accelerator): {len(full_plan)} calls, {seconds:.2f} s")
    return 0


def _timed(engine: object, step: object) -> float:
    began = time.perf_counter()
    engine.warm_up(step)  # type: ignore[attr-defined]
    return time.perf_counter() - began


if __name__ == "__main__":
    sys.exit(main())
