"""Closed-loop runs with wrk (C, epoll) and bench/wrk_post.lua: pre-built requests, no per-request Lua work.

wrk reports the latency percentiles itself (from its own histogram, microseconds); its CPU time
is read from the kernel's accounting of reaped children, so the report can set the generator's
cost beside the server's.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from pathlib import Path

from bench.loadgen import Latencies

SCRIPT = Path(__file__).with_name("wrk_post.lua")


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    path = wrk_path()
    if path is None:
        return "absent"
    # `wrk -v` prints its version and usage to stdout and exits 1.
    output = subprocess.run([path, "-v"], capture_output=True, text=True, check=False).stdout
    return output.splitlines()[0].strip() if output else "unknown"


def run_wrk(
    port: int, requests_file: Path, concurrency: int, duration_s: float, *, threads: int = 1, timeout_s: int = 30
) -> Latencies:
    path = wrk_path()
    if path is None:
        raise RuntimeError("wrk is not installed")
    command = [
        path,
        f"-t{min(threads, concurrency)}",
        f"-c{concurrency}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(SCRIPT),
        f"http://127.0.0.1:{port}",
        "--",
        str(requests_file),
        "0",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=duration_s + timeout_s + 30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((line for line in done.stdout.splitlines() if line.startswith("WRK_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    data = json.loads(line.removeprefix("WRK_RESULT "))
    errors = data["connect"] + data["read"] + data["write"] + data["timeout"]
    elapsed_s = data["duration_us"] / 1e6
    return Latencies(
        requests=data["requests"],
        elapsed_s=elapsed_s,
        throughput=data["requests"] / elapsed_s if elapsed_s > 0 else 0.0,
        p50_s=data["p50_us"] / 1e6,
        p90_s=data["p90_us"] / 1e6,
        p99_s=data["p99_us"] / 1e6,
        p999_s=data["p999_us"] / 1e6,
        mean_s=data["mean_us"] / 1e6,
        max_s=data["max_us"] / 1e6,
        non_2xx=data["status"],
        errors=errors,
        generator_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    )
