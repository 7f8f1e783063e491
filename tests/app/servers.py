"""A real `python -m app` process on 127.0.0.1 for the end-to-end tests (start, wait, stop), and
broken copies of packages for its startup failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.app.conftest import free_port, parse_metrics

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def wait_ready(self, timeout_s: float = 90) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready in {timeout_s} s:\n{self.output()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One answer, framed by its Content-Length, from a connection that may stay open: its head
    (status line and headers) and its body."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(65536)
    head, _, body = reply.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
    while len(body) < length:
        body += sock.recv(65536)
    assert len(body) == length, "more bytes than one answer"
    return head, body


def start_server(package: Path, tmp: Path, *args: str, own_session: bool = False) -> Server:
    """`own_session`: a process group of its own, for a test that stops it (SIGSTOP): were the test
    runner's group orphaned, a stopped member would get SIGHUP from the kernel when another exits."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("FUSION_")}
    command = [sys.executable, "-m", "app", "--model", str(package), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, *args], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=own_session
        )
    return Server(process, port, log)


# No --lookahead-ms: a probe batch made slow by its text runs far past the estimate for its size,
# and the tests that queue a request behind one need it to wait there (as settings_for does).
SERVER_ARGS = (
    "--lookahead-ms",
    "0",
    "--max-batch-size",
    "8",
    "--threads",
    "1",
    "--decode-workers",
    "2",
    "--drain-delay-s",
    "0",
)


@contextmanager
def running_server(package: Path, tmp: Path, *args: str) -> Iterator[Server]:
    """A server that is ready, stopped on the way out whatever happened."""
    server = start_server(package, tmp, *args)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def broken_copy(source: Path, target: Path, **manifest_fields: Any) -> Path:
    """A copy of a package, with these top-level manifest fields replaced."""
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, **manifest_fields}))
    return target
