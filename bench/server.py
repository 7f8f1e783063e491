"""The service under test: `python -m app` as a child process, its readiness, /metrics, memory and CPU.

Time to ready is measured from just before the process is spawned to the first 200 from /readyz
(polled every 10 ms), so it includes the interpreter's start and every import, not only the
phases the service times itself (those are read from `fusion_startup_seconds`).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
Sample = tuple[str, tuple[tuple[str, str], ...]]  # metric sample name, sorted labels
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat): to tell how much CPU other
    processes took while a run was measured."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS


def _stat_fields(path: Path) -> list[str]:
    """The fields of a /proc stat file after "pid (comm) ": field 3 of proc(5) is index 0 here.
    The command name may hold spaces and parentheses, so the split starts after the last ')'."""
    stat = path.read_text()
    return stat[stat.rindex(")") + 2 :].split()


def _cpu_of(pid: int, reaped: bool = False) -> float:
    """utime + stime of a process (with `reaped`: + cutime + cstime, its waited-for children's)."""
    try:
        fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    except OSError:  # exited meanwhile
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)
    return ticks / _CLOCK_TICKS


def disk_reads(pid: int) -> dict[str, int]:
    """What a process had to read from storage so far: major page faults (pages of mapped files,
    such as torch's libraries, not in the page cache) and bytes read (/proc/PID/io). A start that
    found its libraries cached reads next to nothing; one after the cache dropped them reads
    hundreds of MiB, and its time to ready measures the disk more than the service."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {"major_faults": int(fields[9]), "read_bytes": int(io["read_bytes"])}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def http_get(port: int, path: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    args: list[str]
    log_path: Path
    ready_s: float = 0.0
    startup_phases: dict[str, float] = field(default_factory=dict)
    startup_disk: dict[str, int] = field(default_factory=dict)  # major faults, bytes read, by ready

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics(self) -> dict[Sample, float]:
        status, body = http_get(self.port, "/metrics")
        if status != 200:
            raise RuntimeError(f"{self.name}: /metrics answered {status}")
        return parse_metrics(body.decode("utf-8"))

    def info(self) -> dict[str, Any]:
        status, body = http_get(self.port, "/info")
        if status != 200:
            raise RuntimeError(f"{self.name}: /info answered {status}")
        info: dict[str, Any] = json.loads(body)
        return info

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until nothing is queued or decoding and no request finishes between two looks: requests a
        previous run left in flight must not be counted in the next run's numbers."""
        deadline = time.monotonic() + timeout_s
        previous = -1.0
        while time.monotonic() < deadline:
            metrics = self.metrics()
            depth = sum(v for (name, _), v in metrics.items() if name == "fusion_queue_depth")
            done = sum(  # the inference routes only: these scrapes count themselves under /metrics
                v
                for (name, labels), v in metrics.items()
                if name == "fusion_request_duration_seconds_count"
                and dict(labels).get("route") in ("/predict", "/embed")
            )
            if depth == 0 and done == previous:
                return
            previous = done
            time.sleep(0.05)

    def rss_bytes(self) -> int:
        """Resident set size now, of the process and its front-end processes (/proc/PID/statm; pages
        that several processes share, such as libtorch's, count once per process)."""
        total = 0
        for pid in self._family():
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
            except OSError:  # a front-end that exited meanwhile
                pass
        return total

    def cpu_s(self) -> float:
        """User + system CPU time of the process, of its live front-end processes and of those that
        exited (their time moves to the process's cutime and cstime once it reaps them)."""
        return _cpu_of(self.pid, reaped=True) + sum(_cpu_of(pid) for pid in self._family()[1:])

    def _family(self) -> list[int]:
        """The service's pid and its children's (with --frontends N, the front-end processes)."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(_stat_fields(stat)[1])
            except OSError:  # exited meanwhile
                continue
            if parent == self.pid:
                children.append(int(stat.parent.name))
        return [self.pid, *children]

    def main_thread_cpu_s(self) -> float:
        """User + system CPU time of the main thread alone: the one that runs the event loop (HTTP,
        multipart, batching, responses). Near one second per second, the front end is the limit."""
        fields = _stat_fields(Path(f"/proc/{self.pid}/task/{self.pid}/stat"))
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # the service's own drain, with --drain-delay-s 0
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    name: str,
    model: Path,
    extra_args: Sequence[str],
    log_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 300.0,
    prelude: str | None = None,
    root: Path = ROOT,
) -> Server:
    """Start `python -m app` and wait until /readyz answers 200.

    `root`: the checkout whose code runs (`python -m app` imports from its working directory), so
    that two versions of the service can be measured side by side.

    `prelude`: Python run in the service's interpreter before the app (an interpreter setting to
    try, say `import gc; gc.set_threshold(100_000)`), without editing the app. The switch interval
    has its own flag: the server sets it from --switch-interval-ms.
    """
    port = free_port()
    args = [
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--drain-delay-s",
        "0",
        "--log-level",
        "warning",
        *extra_args,
    ]
    log_path = log_dir / f"server-{name}.log"
    log_dir.mkdir(parents=True, exist_ok=True)
    handle = log_path.open("wb")
    began = time.perf_counter()
    launcher = ["-m", "app"]
    if prelude:
        launcher = ["-c", f"{prelude}\nimport runpy\nrunpy.run_module('app', run_name='__main__', alter_sys=True)"]
    process = subprocess.Popen(
        [sys.executable, *launcher, *args],
        cwd=root,
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    handle.close()
    server = Server(name, process, port, args, log_path)
    deadline = began + ready_timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name}: the server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            status, _ = http_get(port, "/readyz", timeout_s=2.0)
        except OSError:
            status = 0
        if status == 200:
            server.ready_s = time.perf_counter() - began
            server.startup_disk = disk_reads(process.pid)
            break
        if time.perf_counter() > deadline:
            server.stop()
            raise RuntimeError(f"{name}: not ready after {ready_timeout_s:.0f} s; see {log_path}")
        time.sleep(0.01)
    metrics = server.metrics()
    server.startup_phases = {
        dict(labels)["phase"]: value
        for (sample, labels), value in metrics.items()
        if sample == "fusion_startup_seconds"
    }
    return server


def parse_metrics(text: str) -> dict[Sample, float]:
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def diff(after: Mapping[Sample, float], before: Mapping[Sample, float]) -> dict[Sample, float]:
    """What happened between two scrapes (counters and histogram series; gauges come out as changes)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def total(samples: Mapping[Sample, float], name: str, **labels: str) -> float:
    """Sum of a sample over all label sets that include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, series), value in samples.items() if sample == name and wanted <= set(series))


def by_label(samples: Mapping[Sample, float], name: str, label: str) -> dict[str, float]:
    result: dict[str, float] = {}
    for (sample, series), value in samples.items():
        if sample == name:
            key = dict(series).get(label, "")
            result[key] = result.get(key, 0.0) + value
    return result
