"""End to end: `python -m app` as a real uvicorn process on 127.0.0.1, real sockets.

Covers what only a real server shows: the drain on SIGTERM, liveness while the device is
saturated, a client that closes its socket, and startup failures that must exit non-zero.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.conftest import form, metric, picture
from tests.app.servers import SERVER_ARGS, Server, broken_copy, read_answer, running_server, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(probe_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(probe_package, tmp_path_factory.mktemp("e2e"), *SERVER_ARGS) as running:
        yield running


def test_endpoints_over_real_sockets(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF"):
            answer = client.post("/predict", **form(picture(fmt=fmt), "What shape?"), headers={"X-Request-ID": "e2e-1"})
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-request-id"] == "e2e-1"
            assert answer.headers["x-model-version"] == "1.2.3-probe"
            assert answer.json()["model"] == {"name": "probe", "version": "1.2.3-probe"}
        both = client.post("/embed", **form(picture(), "q")).json()
        assert set(both) == {"image_embedding", "text_embedding", "similarity", "dim", "model"}
        assert client.get("/healthz").json() == {"status": "alive"}
        assert client.get("/readyz").json() == {"status": "ready"}
        info = client.get("/info").json()
        assert info["model"]["name"] == "probe"
        assert info["switch_interval_ms"] == 0.2  # the service's default, set in the serving process
        missing = client.post("/predict", **form(text="no image"))
        assert missing.status_code == 422 and missing.json()["error"]["code"] == "missing_field"
        assert client.post("/predict", json={"text": "q"}).status_code == 415
        assert metric(server.metrics(), "fusion_startup_seconds", phase="total") > 0


def thread_nices(pid: int) -> dict[int, int]:
    """Each thread's nice value (field 19 of /proc/PID/task/TID/stat)."""
    nices = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        nices[int(task.name)] = int(stat[stat.rindex(")") + 2 :].split()[16])
    return nices


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice values are Linux only")
def test_the_decode_thread_runs_nicer_than_every_other_thread(probe_package: Path, tmp_path: Path) -> None:
    args = (*SERVER_ARGS[:-4], "--drain-delay-s", "0", "--decode-workers", "1", "--decode-nice", "7")
    with running_server(probe_package, tmp_path, *args) as server:
        base = os.getpriority(os.PRIO_PROCESS, server.process.pid)  # the main thread's: the event loop's
        before = thread_nices(server.process.pid)
        assert set(before.values()) == {base}  # the pool starts its thread on first use
        large = picture(size=(600, 600))  # more pixels than --inline-decode-pixels: decoded in the pool
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for i in range(3):
                assert client.post("/predict", **form(large, f"q{i}")).status_code == 200
            assert client.post("/predict", **form(picture(), "small")).status_code == 200  # on the loop
            assert client.get("/info").json()["batching"]["decode_nice"] == 7
        after = thread_nices(server.process.pid)
        assert metric(server.metrics(), "fusion_decoded_on_loop_total", route="/predict") == 1  # the small one
    assert {tid: after[tid] for tid in before} == before
    assert sorted(after[tid] for tid in set(after) - set(before)) == [min(19, base + 7)]


def test_a_declared_oversized_body_is_refused_before_it_is_read(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        reply = b""
        while b'"}}' not in reply:  # the end of the JSON error body
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
    reply_text = reply.decode("latin-1")
    assert reply_text.startswith("HTTP/1.1 413"), reply_text
    assert '"code": "payload_too_large"' in reply_text


def exchange(port: int, request: bytes, pause_after: int = 0, pause_s: float = 0.0) -> tuple[int, bytes]:
    """Send `request` on a fresh connection, pausing `pause_s` after its first `pause_after` bytes;
    the answer's status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request[:pause_after])
        time.sleep(pause_s)
        sock.sendall(request[pause_after:])
        head, body = read_answer(sock)
    return int(head.split()[1]), body


def test_a_deadline_counts_from_the_first_byte_of_the_request(server: Server) -> None:
    """Under load the event loop reads a request a while after it arrived; the client's deadline
    started when it sent it. A request whose head took longer to arrive than its deadline allows
    is answered 504 and never runs; the same request sent at once is served."""
    request = httpx.Request(
        "POST", f"{server.url}/predict", **form(picture(), "in time?"), headers={"X-Request-Timeout-Ms": "200"}
    )
    head = "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
    raw = f"POST /predict HTTP/1.1\r\n{head}\r\n".encode("latin-1") + request.read()
    before = server.metrics()
    status, body = exchange(server.port, raw, pause_after=10, pause_s=0.3)
    assert status == 504 and json.loads(body)["error"]["code"] == "deadline_exceeded"
    after = server.metrics()
    for name, labels in (("fusion_items_executed_total", {"kind": "fuse"}), ("fusion_requests_shed_total", {})):
        assert metric(after, name, **labels) == metric(before, name, **labels)  # neither run nor counted as shed
    expired = metric(after, "fusion_requests_expired_total", stage="before_queue")
    assert expired == metric(before, "fusion_requests_expired_total", stage="before_queue") + 1
    assert exchange(server.port, raw)[0] == 200


def test_healthz_answers_fast_while_the_device_is_saturated(server: Server) -> None:
    def slow(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return client.post("/predict", **form(picture(), "#" * 20 + f" {i}")).status_code

    with ThreadPoolExecutor(24) as pool:
        busy = [pool.submit(slow, i) for i in range(24)]
        time.sleep(0.3)
        timings = []
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(10):
                began = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                timings.append(time.perf_counter() - began)
                time.sleep(0.05)
        still_busy = sum(not future.done() for future in busy)
        assert [future.result() for future in busy] == [200] * 24
    assert still_busy > 0, "the device should still have been busy while /healthz was probed"
    assert max(timings) < 0.1, timings


def test_a_client_that_closes_its_socket_is_not_run(server: Server) -> None:
    executed = metric(server.metrics(), "fusion_items_executed_total", kind="fuse")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, f"{server.url}/predict", timeout=60, **form(picture(), "#" * 60))
        wait_for(lambda: metric(server.metrics(), "fusion_items_executed_total", kind="fuse") == executed + 1)
        request = httpx.Request("POST", f"{server.url}/predict", **form(picture(), "I will leave"))
        body = request.read()
        head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"POST /predict HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body)
            wait_for(lambda: metric(server.metrics(), "fusion_queue_depth", stage="queue") == 1)
        assert not slow.done()
        assert slow.result().status_code == 200
    samples = server.metrics()
    assert metric(samples, "fusion_requests_cancelled_total", reason="client_disconnected") == 1
    assert metric(samples, "fusion_items_executed_total", kind="fuse") == executed + 1


def wait_for(condition: Any, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


@dataclass
class Outcome:
    sent: float
    done: float
    status: int | None = None
    error: str | None = None


@dataclass
class LoadLog:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def test_with_exit_when_dead_a_replica_dead_that_long_stops_by_itself_and_exits_1(
    probe_package: Path, tmp_path: Path
) -> None:
    """A forward pass hangs ('@', about two seconds); the watchdog allows 0.3 s, so /healthz turns
    503; half a second later the process drains and exits 1, for a supervisor that restarts what
    exits (docker compose) to restart it. Without the flag it would stay up, dead, until restarted."""
    args = (*SERVER_ARGS, "--forward-timeout-s", "0.3", "--exit-when-dead-s", "0.5", "--graceful-timeout-s", "5")
    with running_server(probe_package, tmp_path, *args) as server:
        began = time.monotonic()
        hung = httpx.post(f"{server.url}/predict", timeout=30, **form(picture(), "@hangs"))
        assert hung.status_code == 500 and hung.json()["error"]["code"] == "model_timeout"
        assert server.process.wait(30) == 1
        assert time.monotonic() - began < 30
        assert "/healthz has answered 503 for 0.5 s" in server.output()


def test_with_a_startup_timeout_a_replica_not_ready_in_time_exits_1(probe_package: Path, tmp_path: Path) -> None:
    """Not ready 0.01 s after its server started (it is still loading), the replica fails its startup
    and exits 1, for a supervisor that restarts what exits (docker compose); without the flag a
    load that hangs would leave it up, never ready. The grace period (0.1 s) ends with the inference
    thread still inside torch: the interpreter's own exit would abort under it (SIGABRT)."""
    args = (*SERVER_ARGS, "--startup-timeout-s", "0.01", "--graceful-timeout-s", "0.1")
    server = start_server(probe_package, tmp_path, *args)
    try:
        assert server.process.wait(60) == 1
    finally:
        server.stop()
    assert "not ready 0.01 s after starting (still " in server.output()


def test_a_grace_period_used_up_by_a_stuck_upload_still_stops_the_idle_worker_cleanly(
    probe_package: Path, tmp_path: Path
) -> None:
    """A client sends the head and 10 bytes of a body, then nothing: its request outlives the
    grace period, which is spent by the time the lifespan stops the inference thread. The thread
    is idle, and stops as soon as it is told: no error about it, and an exit code of 0."""
    args = (*SERVER_ARGS[:-2], "--drain-delay-s", "0", "--graceful-timeout-s", "1")
    with running_server(probe_package, tmp_path, *args) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as stuck:
            stuck.sendall(b"POST /embed HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n")
            stuck.sendall(b"Content-Length: 1000\r\n\r\n--b\r\nConte")
            time.sleep(0.2)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(30) == 0
    assert "did not stop within the grace period" not in server.output()


def test_sigterm_under_load_drains_and_loses_no_accepted_request(probe_package: Path, tmp_path: Path) -> None:
    """/readyz turns 503 at once; requests are still served during the drain delay; the listener
    then closes; requests already accepted (queued and running) finish; the process exits 0."""
    drain_delay = 3.0
    with running_server(probe_package, tmp_path, *SERVER_ARGS[:-2], "--drain-delay-s", str(drain_delay)) as server:
        log, stop_sending = LoadLog(), threading.Event()
        readiness: dict[str, float] = {}

        def steady_client(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not stop_sending.is_set():
                    outcome = Outcome(sent=time.monotonic(), done=0.0)
                    try:
                        outcome.status = client.post("/predict", **form(picture(), f"steady {i}")).status_code
                    except httpx.TransportError as exc:
                        outcome.error = type(exc).__name__
                    outcome.done = time.monotonic()
                    log.record(outcome)

        def probe_readiness() -> None:
            while "closed" not in readiness:
                try:
                    status = httpx.get(f"{server.url}/readyz", timeout=5).status_code
                    if status == 503:
                        readiness.setdefault("not_ready", time.monotonic())
                except httpx.TransportError:  # refused, or reset from the backlog as the listener closed
                    readiness["closed"] = time.monotonic()
                time.sleep(0.01)

        def slow_request(text: str) -> Outcome:
            outcome = Outcome(sent=time.monotonic(), done=0.0)
            outcome.status = httpx.post(f"{server.url}/predict", timeout=30, **form(picture(), text)).status_code
            outcome.done = time.monotonic()
            return outcome

        with ThreadPoolExecutor(20) as pool:
            steady = [pool.submit(steady_client, i) for i in range(4)]
            prober = pool.submit(probe_readiness)
            time.sleep(0.5)
            sigterm_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            stop_sending.set()  # the load balancer has noticed /readyz and stops sending
            time.sleep(0.5)
            # Work still queued when the listener closes (at drain_delay): one slow request, then
            # eleven more that batch behind it, 2-3 s of device time in all.
            slow = [pool.submit(slow_request, "#" * 60)]
            time.sleep(0.05)
            slow += [pool.submit(slow_request, "#" * 60 + f"{i:02d}") for i in range(11)]
            for future in steady:
                future.result()
            slow_outcomes = [future.result() for future in slow]
            prober.result(timeout=30)
        exit_code = server.process.wait(timeout=30)
        exited_at = time.monotonic()

    assert exit_code == 0, server.output()
    assert [o for o in log.outcomes if o.status != 200] == []  # every request sent was answered 200
    assert readiness["not_ready"] - sigterm_at < 0.5  # at once (the prober polls every 10 ms)
    assert readiness["closed"] - sigterm_at >= drain_delay - 0.1  # served through the drain delay
    assert readiness["not_ready"] < readiness["closed"]
    served_while_draining = [o for o in log.outcomes if o.sent > readiness["not_ready"]]
    assert served_while_draining, "no request was served during the drain delay"
    assert [o.status for o in slow_outcomes] == [200] * 12
    assert max(o.done for o in slow_outcomes) > readiness["closed"], "accepted work finished after the close"
    assert exited_at - sigterm_at < drain_delay + 10


def test_startup_failures_exit_non_zero_with_a_clear_message(probe_package: Path, tmp_path: Path) -> None:
    """As real processes: a refusal before the port is bound and one while loading. Every other
    startup fault goes through the same two paths (test_startup drives `main` for each)."""
    corrupt = broken_copy(probe_package, tmp_path / "corrupt")
    archive = corrupt / "model.pt"
    archive.write_bytes(archive.read_bytes()[:-16] + b"\0" * 16)
    cases = {"missing": tmp_path / "no-such-package", "corrupt": corrupt}
    servers = {name: start_server(package, tmp_path, *SERVER_ARGS) for name, package in cases.items()}
    try:
        codes = {name: server.process.wait(timeout=90) for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    output = {name: server.output() for name, server in servers.items()}
    assert codes == dict.fromkeys(cases, 1), output
    assert "cannot serve" in output["missing"] and "manifest not found" in output["missing"]
    assert "startup failed" in output["corrupt"] and "sha256" in output["corrupt"]
    assert all("Traceback" not in text for text in output.values())
