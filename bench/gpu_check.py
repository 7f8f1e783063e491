"""GPU check, one prepared script: `python -m bench.gpu_check [--model DIR]` (at most ~8 minutes on CUDA).

1. parity: the package on CUDA (IEEE float32, as served) against the package on the CPU, on the
   golden inputs and on a batch of the benchmark mix, for all three methods, each compared on its
   third call at a shape (the graph TorchScript specialized for it, kernels fused on CUDA, as it
   serves): max abs error against the golden tolerance, and the arg-max agreement; then, as
   information, the error with cuDNN's TF32 convolutions, and fp16 autocast against fp32;
2. in-process GPU ceiling: forward only per lane at batch sizes 1..256, host-to-device copy from
   pinned memory included; the preprocessing rate on every core (a process pool) and on one; JPEG
   decoding with Pillow against torchvision's decode_jpeg on the GPU;
3. served: `python -m app --device cuda` driven closed loop at several concurrencies by
   bench.loadgen in several processes, with the mean batch size from /metrics; then at
   `--precision fp16` (bf16 in the dry run) at the two highest concurrencies, then with
   `--lookahead-ms 2` (the next batch handed to the device before the running one ends), then with
   `--frontends F` (F = half the cores, at most 8; 2 in the dry run), several processes answering
   HTTP into the one batcher, each at the two highest concurrencies; every served row says how
   busy the event loop and the device were;
4. a short table, printed last, whatever happened before: a section that fails becomes a note, a
   served section that would not fit in `--budget-s` is skipped (and one that started waits for
   its service only as long as the budget leaves), and 15 s past the budget a watchdog stops the
   check where it is and prints the table with what was measured; 45 s after that, a main thread
   stuck inside a CUDA call is ended with every thread's traceback.

`--dry-run` runs the same steps on the CPU with a tiny model and tiny durations (well under 30 s):
the test suite runs it so the script cannot rot.

A GPU host without network access may lack the service's web packages (fastapi, starlette,
uvicorn, python-multipart, pydantic-settings): bring them as wheels. Without them steps 1 and 2
still run and step 3 says what is missing. If the shipped archive cannot be loaded by that host's
torch, a randomly initialized package of the manifest's architecture is exported there and
measured instead (the same cost), and the table says so.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import io
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from PIL import Image

from bench import loadgen
from bench.inprocess import KINDS, median_time, run_lane
from bench.payloads import MixSpec, Payload, build_mix
from model.config import FusionConfig, ImageTowerConfig, TextTowerConfig
from model.manifest import PackageError, read_manifest
from model.package import GOLDEN_ATOL, ModelPackage, golden_inputs, load_package, verify_golden
from model.preprocess import decode_image, pad_tokens, tokenize

# On a GPU the loop's round trip between two batches (hear the end, take the next, wake the
# inference thread; 0.6-0.8 ms measured on a CPU host) is device time lost, against batches of a
# few milliseconds: the check measures the service with the next batch handed over this early.
LOOKAHEAD_MS = 2
# What a served section allows for the service's start (load, warm-up of every batch size, the
# self-check) and stop, beside its runs; and the longest it waits for the service to be ready.
STARTUP_ALLOWANCE_S = 60.0
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0  # the service drains nothing after a run: past this it is killed
# Past the budget by this much the check stops where it is and prints its table; OVERRUN_GRACE_S
# later, with the main thread stuck outside Python (a hung CUDA call), faulthandler dumps every
# thread and exits, so the run still ends with a reason (arm_watchdog): 8 minutes for a 420 s budget.
OVERRUN_S = 15.0
# From Overrun to faulthandler's exit: a served run stopped by Overrun waits for its load processes,
# whose requests end within the service's forward timeout (30 s) even when a pass hangs, then for
# the service's stop (STOP_TIMEOUT_S).
OVERRUN_GRACE_S = 45.0
T = TypeVar("T")
SERVICE_PACKAGES = ("fastapi", "starlette", "uvicorn", "python_multipart", "pydantic_settings", "prometheus_client")
TINY = FusionConfig(
    image=ImageTowerConfig(size=(32, 32), widths=(8, 16, 16), context_layers=1),
    text=TextTowerConfig(kind="transformer", max_length=64, layers=1, heads=2),
    width=32,
    fusion_layers=1,
    fusion_heads=2,
    embed_dim=16,
    num_labels=22,
)


def say(message: str) -> None:
    sys.stderr.write(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def export_random(config: FusionConfig, name: str) -> Path:
    from model.export import export_random_package

    labels = [f"label{i}" for i in range(config.num_labels)]
    target = Path(tempfile.mkdtemp(prefix="gpu-check-")) / name
    export_random_package(target, config, labels, seed=0, name=name)
    return target


def pick_model(model: Path | None, dry_run: bool) -> tuple[Path, str]:
    if dry_run:
        return export_random(TINY, "tiny"), "tiny random model (dry run)"
    from bench.suite import resolve_model

    path, source = resolve_model(model)
    try:
        load_package(path, "cpu")
        return path, source
    except Exception as exc:  # an archive from a newer torch, say: measure the same architecture instead
        say(f"{path} does not load here ({type(exc).__name__}: {str(exc)[:200]}); exporting its architecture")
        config = FusionConfig.from_dict(read_manifest(path).model_config)
        return export_random(config, "same-architecture"), f"random weights, architecture of {path}"


# -- 1. parity -------------------------------------------------------------------------------------


# TorchScript's profiling executor runs a shape's first calls as they are and, from the third, the
# graph it specialized for the shape (on CUDA with kernels fused and compiled for it): what serves.
CALLS_TO_SPECIALIZE = 3


@torch.inference_mode()
def outputs(package: ModelPackage, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every method's outputs on these inputs, from the call that runs the specialized graph."""
    device = package.device
    images, tokens = images.to(device), tokens.to(device)
    for _ in range(CALLS_TO_SPECIALIZE):
        result = dict(package.module(images, tokens))
        result["encode_image"] = package.module.encode_image(images)
        result["encode_text"] = package.module.encode_text(tokens)
    return {name: value.float().cpu() for name, value in result.items()}


def parity(
    reference: ModelPackage, candidate: ModelPackage, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, Any]:
    errors: dict[str, float] = {}
    agree = total = 0
    for images, tokens in batches:
        expected, actual = outputs(reference, images, tokens), outputs(candidate, images, tokens)
        for name, value in expected.items():
            errors[name] = max(errors.get(name, 0.0), float((value - actual[name]).abs().max()))
        agree += int((expected["logits"].argmax(1) == actual["logits"].argmax(1)).sum())
        total += len(images)
    worst = max(errors.values())
    return {"errors": errors, "worst": worst, "argmax": agree / total, "ok": worst <= GOLDEN_ATOL and agree == total}


@torch.inference_mode()
def half_parity(package: ModelPackage, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> str:
    device = package.device
    if device.type != "cuda":
        return "fp16 autocast: n/a on the CPU"
    try:
        worst, agree, total = 0.0, 0, 0
        for images, tokens in batches:
            full = outputs(package, images, tokens)
            with torch.autocast("cuda", dtype=torch.float16):
                for _ in range(CALLS_TO_SPECIALIZE):  # the specialized graph, as with `outputs`
                    half = dict(package.module(images.to(device), tokens.to(device)))
            for name in ("image_embedding", "text_embedding"):
                worst = max(worst, float((half[name].float().cpu() - full[name]).abs().max()))
            agree += int((half["logits"].float().cpu().argmax(1) == full["logits"].argmax(1)).sum())
            total += len(images)
        return f"fp16 autocast vs fp32: embeddings max err {worst:.2g}, arg-max agreement {agree / total:.1%}"
    except Exception as exc:
        return f"fp16 autocast failed: {type(exc).__name__}: {str(exc)[:120]}"


def parity_batches(package: ModelPackage, payloads: Sequence[Payload]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    manifest = package.manifest
    batches = [golden_inputs(package.path, manifest)]
    fused = [p for p in payloads if p.kind == "fuse"][:16]
    images = np.stack([decode_image(p.image, manifest.image_size) for p in fused])  # type: ignore[arg-type]
    tokens = pad_tokens([tokenize(p.text, manifest.max_text_length).ids for p in fused])  # type: ignore[arg-type]
    batches.append((torch.from_numpy(images), torch.from_numpy(tokens)))
    return batches


# -- 2. in-process ceiling -------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def forward_rates(
    package: ModelPackage, payloads: Sequence[Payload], sizes: Sequence[int], seconds: float
) -> dict[str, dict[int, float]]:
    """Items/s per lane and batch size, copying each batch from pinned host memory to the device."""
    manifest, device = package.manifest, package.device
    pin = device.type == "cuda"
    rates: dict[str, dict[int, float]] = {}
    for kind in KINDS:
        items = [p for p in payloads if p.kind == kind]
        if not items:
            continue
        rates[kind] = {}
        for size in sizes:
            chosen = [items[i % len(items)] for i in range(size)]
            images = (
                torch.from_numpy(np.stack([decode_image(p.image, manifest.image_size) for p in chosen]))  # type: ignore[arg-type]
                if kind != "text"
                else None
            )
            tokens = (
                torch.from_numpy(pad_tokens([tokenize(p.text, manifest.max_text_length).ids for p in chosen]))  # type: ignore[arg-type]
                if kind != "image"
                else None
            )
            if pin:
                images = images.pin_memory() if images is not None else None
                tokens = tokens.pin_memory() if tokens is not None else None

            def step() -> None:
                on_image = images.to(device, non_blocking=True) if images is not None else None  # noqa: B023
                on_tokens = tokens.to(device, non_blocking=True) if tokens is not None else None  # noqa: B023
                run_lane(package.module, kind, on_image, on_tokens)  # noqa: B023

            for _ in range(3):
                step()
            _sync(device)
            calls = 0
            began = time.perf_counter()
            while calls < 3 or time.perf_counter() - began < seconds:
                step()
                calls += 1
            _sync(device)
            rates[kind][size] = calls * size / (time.perf_counter() - began)
    return rates


def _preprocess_chunk(args: tuple[list[tuple[bytes | None, str | None]], tuple[int, int], int, float]) -> int:
    items, size, max_length, seconds = args
    torch.set_num_threads(1)
    done = 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        image, text = items[done % len(items)]
        if image is not None:
            decode_image(image, size)
        if text is not None:
            tokenize(text, max_length)
        done += 1
    return done


def preprocess_rate(payloads: Sequence[Payload], package: ModelPackage, processes: int, seconds: float) -> float:
    """Requests/s that `processes` processes preprocess together (decode_image + tokenize)."""
    manifest = package.manifest
    items = [(p.image, p.text) for p in payloads]
    job = (items, manifest.image_size, manifest.max_text_length, seconds)
    if processes <= 1:
        return _preprocess_chunk(job) / seconds
    with ProcessPoolExecutor(processes) as pool:
        pool.submit(_preprocess_chunk, (items[:1], manifest.image_size, manifest.max_text_length, 0.01)).result()
        # Each worker counts for `seconds` of its own: the wall time around them would add the
        # pickling of the payloads to every process.
        counts = list(pool.map(_preprocess_chunk, [job] * processes))
        return sum(counts) / seconds


def jpeg_decode_times(payloads: Sequence[Payload], package: ModelPackage, device: torch.device) -> str:
    """Per JPEG of the mix (largest of each size): the service's decode (Pillow at reduced DCT scale,
    then the resize, on one core) against torchvision's decode_jpeg on `device` (nvJPEG on CUDA)
    with an antialiased resize there: whether decoding on the GPU would pay."""
    from torchvision.io import decode_jpeg  # torchvision ships with the service's torch

    height, width = package.manifest.image_size
    largest: dict[tuple[int, int], bytes] = {}
    for payload in payloads:
        if payload.image is not None and payload.image[:3] == b"\xff\xd8\xff":
            with Image.open(io.BytesIO(payload.image)) as image:
                size = image.size
            if len(payload.image) > len(largest.get(size, b"")):
                largest[size] = payload.image
    cells = []
    for (w, h), data in sorted(largest.items(), key=lambda item: item[0][0] * item[0][1]):
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)

        def on_device(encoded: torch.Tensor = encoded) -> torch.Tensor:
            pixels = decode_jpeg(encoded, device=device).unsqueeze(0).float()
            resized = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return resized

        on_device()  # the decoder's first call initializes it
        cpu = median_time(partial(decode_image, data, (height, width)), 5)
        gpu = median_time(on_device, 5)
        cells.append(f"{w}x{h} {cpu * 1e3:.2f} vs {gpu * 1e3:.2f} ms")
    return f"JPEG decode + resize, Pillow (reduced DCT) vs decode_jpeg on {device.type}: " + "; ".join(cells)


# -- 3. served -------------------------------------------------------------------------------------


def _closed_chunk(args: tuple[int, list[bytes], int, float, int]) -> tuple[list[float], list[int], float, int]:
    port, requests, connections, seconds, offset = args
    result = loadgen.run_async(
        lambda: loadgen.closed_loop("127.0.0.1", port, requests, connections, duration_s=seconds, start_index=offset)
    )
    return result.latencies, result.statuses, result.elapsed_s, result.connection_errors


def served_run(port: int, requests: list[bytes], concurrency: int, seconds: float, processes: int) -> dict[str, float]:
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    jobs = [(port, requests, share, seconds, i * 37) for i, share in enumerate(shares)]
    if processes == 1:
        parts = [_closed_chunk(jobs[0])]
    else:
        with ProcessPoolExecutor(processes) as pool:
            parts = list(pool.map(_closed_chunk, jobs))
    latencies = [x for part in parts for x in part[0]]
    statuses = [x for part in parts for x in part[1]]
    elapsed = max(part[2] for part in parts)
    failed_connections = sum(part[3] for part in parts)
    return {
        "throughput": len(latencies) / elapsed if elapsed else 0.0,
        "p50": loadgen.percentile(latencies, 50),
        "p99": loadgen.percentile(latencies, 99),
        "errors": sum(status != 200 for status in statuses) + failed_connections,
        "requests": len(latencies),
    }


def served(
    model: Path,
    device: str,
    payloads: Sequence[Payload],
    concurrencies: Sequence[int],
    seconds: float,
    extra: list[str],
    cores: int,
    ends: float,
    rows: list[tuple[int, dict[str, float]]],
) -> str:
    """The service at each concurrency, within `ends` (time.perf_counter()): its start may take what
    is left after the runs, and a concurrency that would end past it is not run. Each row goes into
    `rows` as it is measured, so a section stopped midway (the watchdog) keeps what it measured."""
    missing = [name for name in SERVICE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return f"service not run: missing {', '.join(missing)} (carry them as wheels)"
    from bench.analysis import stage_breakdown
    from bench.server import diff, start_server, total

    log_dir = Path(tempfile.mkdtemp(prefix="gpu-check-logs-"))
    runs_s = (len(concurrencies) + 1) * seconds
    ready_timeout_s = min(READY_TIMEOUT_S, max(10.0, ends - time.perf_counter() - runs_s))
    server = start_server("gpu-check", model, ["--device", device, *extra], log_dir, ready_timeout_s=ready_timeout_s)
    try:
        if "--frontends" in extra:  # the device process is ready first; its front-ends listen just after
            wanted = float(extra[extra.index("--frontends") + 1]) - 1
            end = min(time.perf_counter() + 60, ends - runs_s)
            while server.metrics().get(("fusion_frontends_connected", ()), 0.0) < wanted and time.perf_counter() < end:
                time.sleep(0.1)
        phases = server.startup_phases.get("total", float("nan"))
        note = f"service ready in {server.ready_s:.1f} s (inside: {phases:.1f} s)"
        requests = [p.request() for p in payloads]
        processes = max(1, min(4, cores // 4))
        served_run(server.port, requests, max(concurrencies), min(seconds, 3.0), processes)  # warm the connections
        for concurrency in concurrencies:
            if time.perf_counter() + seconds > ends:
                note += f"; concurrency {concurrency} and above skipped: the time budget is spent"
                break
            before, cpu, loop_cpu, began = server.metrics(), server.cpu_s(), server.main_thread_cpu_s(), time.time()
            row = served_run(server.port, requests, concurrency, seconds, processes)
            wall = time.time() - began
            delta = diff(server.metrics(), before)
            row["mean_batch"] = stage_breakdown(delta).get("mean_batch", float("nan"))
            row["cores"] = (server.cpu_s() - cpu) / wall  # the whole service
            row["loop"] = (server.main_thread_cpu_s() - loop_cpu) / wall  # its event loop thread
            # The share of the wall time the device spent running batches: what --lookahead-ms is for.
            row["device"] = total(delta, "fusion_batch_duration_seconds_sum") / wall
            rows.append((concurrency, row))
            say(f"served c={concurrency}: {row['throughput']:.0f} req/s, p50 {row['p50'] * 1e3:.1f} ms")
    finally:
        server.stop(STOP_TIMEOUT_S)
    return note


# -- the check -------------------------------------------------------------------------------------


def usable_cores() -> int:
    """The service's own count (CPU set, capped by a container's CPU quota); the CPU set alone
    where the service's packages are missing."""
    try:
        from app.config import available_cores
    except ImportError:
        return len(os.sched_getaffinity(0))
    return available_cores()


@contextmanager
def tf32_convolutions() -> Iterator[None]:
    """cuDNN's default elsewhere (float32 convolutions in TF32), for as long as the block runs;
    loading a package on CUDA turns it off (model.package.use_ieee_float32)."""
    conv = cast(Any, torch.backends.cudnn).conv  # torch >= 2.9; the stubs do not declare it
    before = conv.fp32_precision
    conv.fp32_precision = "tf32"
    try:
        yield
    finally:
        conv.fp32_precision = before


class Overrun(BaseException):
    """The check ran past its budget by OVERRUN_S: raised into whatever the main thread waits on. Not
    an Exception, so that no section's handler takes it for that section's failure and goes on: the
    table prints (main's `finally`), then the traceback says where it stopped."""


def arm_watchdog(after_s: float, grace_s: float = OVERRUN_GRACE_S) -> None:
    """After `after_s`, Overrun in the main thread; after `grace_s` more, a traceback of every thread
    and exit 1, for a main thread stuck where no signal reaches Python (inside a CUDA call, say)."""

    def overrun(signum: int, frame: object) -> None:
        raise Overrun(f"still running {after_s:.0f} s after the start: stopped here")

    signal.signal(signal.SIGALRM, overrun)
    signal.setitimer(signal.ITIMER_REAL, after_s)
    faulthandler.dump_traceback_later(after_s + grace_s, exit=True)


def attempt(notes: list[str], what: str, step: Callable[[], T], fallback: T) -> T:
    """Run one section; a failure becomes a note in the table (and its traceback goes to stderr)."""
    try:
        return step()
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        notes.append(f"{what}: not measured ({type(exc).__name__}: {exc})")
        say(notes[-1])
        return fallback


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model package (default: weights/shapesqa, else random weights)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, tiny durations")
    parser.add_argument("--concurrency", default="1,8,32,64,128")
    parser.add_argument("--seconds", type=float, default=10.0, help="per served run")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="the whole check's time: sections that would not fit are skipped"
    )
    parser.add_argument("--server-arg", action="append", default=[], help="a `python -m app` flag (repeatable)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    ends = began + args.budget_s  # a served section that would not fit is skipped, so the table still comes
    # The service's own setting: one intra-op thread on the inference thread (on CUDA it only
    # launches kernels; on the CPU dry run, more threads than the free cores make the timings noise).
    torch.set_num_threads(1)

    if args.dry_run:
        device = torch.device("cpu")
        concurrencies, seconds, sizes, ceiling_s = [1, 4], 1.0, [1, 4], 0.2
        mix = MixSpec(slots=24, scenes_per_side=1, photo=(800, 600))
        extra = ["--max-batch-size", "4", *args.server_arg]
    else:
        if not torch.cuda.is_available():
            sys.stderr.write("gpu_check: no CUDA device here (use --dry-run to exercise the script on the CPU)\n")
            return 2
        device = torch.device("cuda")
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        seconds, sizes, ceiling_s = args.seconds, [1, 2, 4, 8, 16, 32, 64, 128, 256], 1.0
        mix, extra = MixSpec(), list(args.server_arg)

    cores = usable_cores()
    model, source = pick_model(args.model, args.dry_run)
    manifest = read_manifest(model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    lines = [
        "",
        f"GPU check: {name}, torch {torch.__version__}, {cores} cores; "
        f"model {manifest.name} {manifest.version} ({source})",
    ]
    notes: list[str] = []
    served_rows: list[tuple[str, list[tuple[int, dict[str, float]]]]] = []
    passed = False
    arm_watchdog(max(1.0, ends + OVERRUN_S - time.perf_counter()))  # disarmed in the `finally` below
    try:
        say(f"model {model} ({source}); building the payload mix")
        payloads = build_mix(mix, manifest.max_text_length)

        say("parity")
        reference = load_package(model, "cpu")
        candidate = load_package(model, device, check_golden=False)  # on CUDA: IEEE float32 from here on
        try:
            verify_golden(candidate)  # what the service runs at startup, on the device
            golden = f"golden check on {device.type}: pass"
        except PackageError as exc:
            golden = f"golden check on {device.type}: FAIL: {exc}"
        batches = parity_batches(reference, payloads)
        check = parity(reference, candidate, batches)
        passed = bool(check["ok"])
        lines.append(
            f"parity {device.type} vs cpu (fp32): "
            + ", ".join(f"{k} {v:.2g}" for k, v in check["errors"].items())
            + f"; arg-max agreement {check['argmax']:.1%} -> {'PASS' if passed else 'FAIL'} (atol {GOLDEN_ATOL})"
        )
        if device.type == "cuda":  # what serving would give without use_ieee_float32

            def with_tf32() -> str:
                with tf32_convolutions():
                    worst = parity(reference, candidate, batches)["worst"]
                return f"; with cuDNN's TF32 convolutions: worst error {worst:.2g}"

            golden += attempt(notes, "parity with TF32 convolutions", with_tf32, "")
        lines += [golden, half_parity(candidate, batches)]
        say(lines[-3])

        say("in-process ceilings")
        no_rates: dict[str, dict[int, float]] = {}
        rates = attempt(notes, "forward rates", partial(forward_rates, candidate, payloads, sizes, ceiling_s), no_rates)
        fuse = rates.get("fuse", {})
        best = max(fuse, key=fuse.__getitem__) if fuse else 0
        pre_s = ceiling_s * (1 if args.dry_run else 3)
        processes = 1 if args.dry_run else cores
        pre_all = attempt(notes, "preprocessing", lambda: preprocess_rate(payloads, candidate, processes, pre_s), 0.0)
        pre_one = attempt(notes, "preprocessing", lambda: preprocess_rate(payloads, candidate, 1, pre_s), 0.0)
        # A torchvision without nvJPEG, for one: the rest of the check stands.
        jpeg = attempt(
            notes, f"JPEG decode on {device.type}", lambda: jpeg_decode_times(payloads, candidate, device), ""
        )
        lines += [
            "forward items/s (fuse lane) by batch: " + ", ".join(f"{b}: {r:.0f}" for b, r in fuse.items()),
            f"in-process ceiling: forward {fuse.get(best, 0):.0f} items/s at batch {best}"
            + (f" (32, the service's largest batch by default: {fuse[32]:.0f})" if 32 in fuse and best != 32 else "")
            + f"; preprocessing {pre_all:.0f} req/s on {processes} process(es), {pre_one:.0f} req/s on one",
            *([jpeg] if jpeg else []),
        ]
        say(lines[-2 if jpeg else -1])

        reduced = "bf16" if args.dry_run else "fp16"
        frontends = 2 if args.dry_run else max(2, min(8, cores // 2))
        variants = (
            ("fp32", concurrencies, extra),
            (reduced, concurrencies[-2:], [*extra, "--precision", reduced]),
            (f"fp32, --lookahead-ms {LOOKAHEAD_MS}", concurrencies[-2:], [*extra, "--lookahead-ms", str(LOOKAHEAD_MS)]),
            (f"fp32, {frontends} processes", concurrencies[-2:], [*extra, "--frontends", str(frontends)]),
        )
        for label, levels, flags in variants:
            needed = STARTUP_ALLOWANCE_S + (len(levels) + 1) * seconds
            if time.perf_counter() + needed > ends:
                notes.append(f"served {label}: skipped, about {needed:.0f} s needed and the time budget is spent")
                say(notes[-1])
                continue
            say(f"served {label}")
            rows: list[tuple[int, dict[str, float]]] = []
            served_rows.append((label, rows))  # filled as measured: a section the watchdog stops keeps its rows
            run = partial(served, model, str(device), payloads, levels, seconds, flags, cores, ends, rows)
            note = attempt(notes, f"served {label}", run, "")
            if note:
                notes.append(f"{label}: {note}")
    except Exception as exc:  # parity or the mix failed: say so, with what was measured before
        traceback.print_exc(file=sys.stderr)
        notes.append(f"stopped: {type(exc).__name__}: {exc}")
        passed = False
    finally:
        lines += [
            *notes,
            "",
            "| service | concurrency | req/s | p50 ms | p99 ms | mean batch | non-200 | cores | event loop busy "
            "| device busy |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, rows in served_rows:
            for concurrency, row in rows:
                lines.append(
                    f"| {label} | {concurrency} | {row['throughput']:.0f} | {row['p50'] * 1e3:.1f} | "
                    f"{row['p99'] * 1e3:.1f} | {row['mean_batch']:.1f} | {row['errors']:.0f} | {row['cores']:.2f} | "
                    f"{row['loop']:.0%} | {row['device']:.0%} |"
                )
        lines.append(f"({time.perf_counter() - began:.0f} s)")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
    return 0 if passed and any(rows for _, rows in served_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
