"""HAProxy, configured by deploy/haproxy/haproxy.cfg as shipped, in front of three real replicas.

Three `python -m app` processes serve a tiny real model package on 127.0.0.1, and HAProxy
balances them with fast health checks (the intervals are the configuration's environment knobs;
everything else is the production file). Each case runs a steady load of real multipart /predict
requests through HAProxy, counts every answer that is not a 200, and meanwhile terminates, kills,
restarts, or keeps alive-but-not-ready one of the replicas.

The cluster is shared by the module (starting replicas is the slow part); every case begins from
three ready replicas that HAProxy has up, restarting whatever the previous case stopped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import png_bytes
from tests.deploy.conftest import HAPROXY_CFG, REPO

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

# The replicas' drain window (production: 5 s). HAProxy must mark a draining replica down inside
# it: with the check intervals below that takes about 0.3 s.
DRAIN_DELAY_S = 1.5
GRACEFUL_TIMEOUT_S = 10.0
# A check every 200 ms, every 100 ms while a replica is changing state; down after 2 failed checks
# and up after 2 passed ones (the configuration's fall and rise).
CHECK_ENV = {
    "FUSION_LB_CHECK_INTER": "200ms",
    "FUSION_LB_CHECK_FASTINTER": "100ms",
    "FUSION_LB_CHECK_DOWNINTER": "200ms",
}
# Bounds for waiting on state changes that take well under a second when the machine is idle.
STATE_CHANGE_TIMEOUT_S = 10.0
START_TIMEOUT_S = 90.0
EXIT_TIMEOUT_S = DRAIN_DELAY_S + GRACEFUL_TIMEOUT_S + 10.0
# Client threads; each has at most one request in flight.
WORKERS = 4
PREDICT_TEXT = "what shape is the object?"


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.02) -> float:
    """Poll until condition() holds; returns the time.monotonic() at which it did."""
    end = time.monotonic() + timeout_s
    while True:
        if condition():
            return time.monotonic()
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def child_env() -> dict[str, str]:
    """This environment without FUSION_* variables: the processes take their settings from flags."""
    return {name: value for name, value in os.environ.items() if not name.startswith("FUSION_")}


def free_ports(count: int) -> list[int]:
    """Free ports below the ephemeral range.

    Replicas restart on the same port. A port from the ephemeral range could meanwhile be the local
    end of one of the many short connections HAProxy's checks open (or sit in TIME_WAIT), and the
    restart would fail to bind; ports below the range are never handed out that way.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    ports: list[int] = []
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise AssertionError("no free ports below the ephemeral range")


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(eq=False)
class Replica:
    """One `python -m app` process, started and stopped by the test."""

    name: str
    port: int
    package: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    drain_delay_s: float = DRAIN_DELAY_S

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, drain_delay_s: float = DRAIN_DELAY_S) -> None:
        assert not self.running, f"{self.name} is already running"
        self.drain_delay_s = drain_delay_s
        # Small and fast: one torch thread and one decoding thread each, so three replicas, the
        # balancer and the clients share two cores without starving one another.
        command = [
            sys.executable,
            "-m",
            "app",
            "--model",
            str(self.package),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            "cpu",
            "--threads",
            "1",
            "--decode-workers",
            "1",
            "--max-batch-size",
            "4",
            "--drain-delay-s",
            str(drain_delay_s),
            "--graceful-timeout-s",
            str(GRACEFUL_TIMEOUT_S),
        ]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        def ready() -> bool:
            if not self.running:
                raise AssertionError(f"{self.name} exited while starting:\n{log_tail(self.log_path)}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, START_TIMEOUT_S, f"{self.name} to be ready", interval_s=0.1)

    def send(self, sig: signal.Signals) -> float:
        """Send a signal; returns when it was sent (time.monotonic())."""
        assert self.process is not None and self.running, f"{self.name} is not running"
        sent = time.monotonic()
        self.process.send_signal(sig)
        return sent

    def wait_exit(self) -> int:
        assert self.process is not None
        try:
            return self.process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running {EXIT_TIMEOUT_S} s later:\n{log_tail(self.log_path)}"
            ) from None

    def stop(self) -> None:
        """Gone at once, whatever it was doing (teardown, and replicas left in a test's state)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def status_of(self, path: str) -> int:
        return httpx.get(f"{self.url}{path}", timeout=5).status_code

    def predict_requests(self) -> float:
        """/predict requests this process answered, by its own /metrics."""
        response = httpx.get(f"{self.url}/metrics", timeout=5)
        response.raise_for_status()
        total = 0.0
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == "fusion_requests_total" and sample.labels.get("route") == "/predict":
                    total += sample.value
        return total


@dataclass(eq=False)
class Balancer:
    """HAProxy with the shipped configuration and a servers file for the replicas."""

    binary: str
    servers_cfg: Path
    port: int
    stats_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **child_env(),
            **CHECK_ENV,
            "FUSION_LB_BIND": f"127.0.0.1:{self.port}",
            "FUSION_LB_STATS_BIND": f"127.0.0.1:{self.stats_port}",
        }
        command = [self.binary, "-db", "-f", str(HAPROXY_CFG), "-f", str(self.servers_cfg)]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

        def answering() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"haproxy exited:\n{log_tail(self.log_path)}")
            try:
                self.servers()
            except httpx.TransportError:
                return False
            return True

        wait_until(answering, STATE_CHANGE_TIMEOUT_S, "haproxy to answer", interval_s=0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # HAProxy's hard stop: nothing of it is worth waiting for here
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def rows(self) -> dict[str, dict[str, str]]:
        """The stats page's rows for the backend (BACKEND) and its servers, by name."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2).text
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "replicas"}

    def servers(self) -> dict[str, dict[str, str]]:
        return {name: row for name, row in self.rows().items() if name not in {"FRONTEND", "BACKEND"}}

    def retries(self) -> int:
        """Requests HAProxy sent again (to another replica) so far."""
        backend = self.rows()["BACKEND"]
        return int(backend["wretr"] or 0) + int(backend["wredis"] or 0)

    def status(self, name: str) -> str:
        return self.servers()[name]["status"]

    def sessions(self, name: str) -> int:
        """Connections HAProxy has sent to this server (health checks not counted)."""
        return int(self.servers()[name]["stot"])

    def wait_status(self, name: str, status: str) -> float:
        return wait_until(lambda: self.status(name) == status, STATE_CHANGE_TIMEOUT_S, f"haproxy: {name} {status}")


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic() before sending
    ended: float
    status: int | None  # None: no HTTP answer at all
    detail: str = ""


class Load:
    """WORKERS client threads, each sending /predict through the balancer and waiting for the answer.

    Bounded: every thread stops at stop() or after limit_s, whichever comes first.
    """

    def __init__(self, url: str, workers: int = WORKERS, limit_s: float = 120.0) -> None:
        self.url = url
        self.limit_s = limit_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(index,), name=f"load-{index}", daemon=True)
            for index in range(workers)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in self._threads), "a load thread did not stop"

    def _run(self, index: int) -> None:
        image = png_bytes(color=(40 + 50 * index, 120, 200 - 40 * index))
        end = time.monotonic() + self.limit_s
        with httpx.Client(base_url=self.url, timeout=20) as client:
            while not self._stop.is_set() and time.monotonic() < end:
                started = time.monotonic()
                try:
                    response = client.post(
                        "/predict", files={"image": ("q.png", image, "image/png")}, data={"text": PREDICT_TEXT}
                    )
                    ok = response.status_code == 200
                    outcome = Outcome(started, time.monotonic(), response.status_code, "" if ok else response.text)
                except httpx.HTTPError as exc:
                    outcome = Outcome(started, time.monotonic(), None, repr(exc))
                with self._lock:
                    self.outcomes.append(outcome)

    def answered(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_answered(self, count: int) -> None:
        """Until `count` more answers came: the load is flowing."""
        target = self.answered() + count
        wait_until(lambda: self.answered() >= target, STATE_CHANGE_TIMEOUT_S, f"{count} answers")

    def keep_going(self, seconds: float) -> None:
        before = self.answered()
        time.sleep(seconds)
        assert self.answered() > before, "no request was answered: the load stalled"

    def failures(self) -> list[Outcome]:
        with self._lock:
            return [outcome for outcome in self.outcomes if outcome.status != 200]


@dataclass(eq=False)
class Cluster:
    replicas: list[Replica]
    balancer: Balancer

    def ensure_serving(self) -> None:
        """All replicas running with the test's drain delay, ready, and up in HAProxy."""
        for replica in self.replicas:
            if replica.running and replica.drain_delay_s != DRAIN_DELAY_S:
                replica.stop()
            if not replica.running:
                replica.start()
        for replica in self.replicas:
            replica.wait_ready()
        for replica in self.replicas:
            self.balancer.wait_status(replica.name, "UP")

    def restart(self, replica: Replica, drain_delay_s: float = DRAIN_DELAY_S) -> None:
        replica.start(drain_delay_s)
        replica.wait_ready()
        self.balancer.wait_status(replica.name, "UP")


def summary(case: str, load: Load, retried: int) -> str:
    failures = load.failures()
    text = f"{case}: {len(load.outcomes)} requests, {len(failures)} failed, {retried} retried by HAProxy"
    log.info(text)
    return text + "".join(f"\n  {failure}" for failure in failures[:10])


@pytest.fixture(scope="module")
def cluster(haproxy_binary: str, tiny_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("load_balancer")
    ports = free_ports(5)
    replicas = [Replica(f"replica{i + 1}", ports[i], tiny_package, work / f"replica{i + 1}.log") for i in range(3)]
    # The servers file, as deploy/haproxy/haproxy.cfg expects it: the backend and its servers only.
    servers_cfg = work / "servers.cfg"
    servers_cfg.write_text(
        "backend replicas\n" + "".join(f"    server {r.name} 127.0.0.1:{r.port} check\n" for r in replicas)
    )
    balancer = Balancer(haproxy_binary, servers_cfg, ports[3], ports[4], work / "haproxy.log")
    try:
        for replica in replicas:
            replica.start()
        balancer.start()
        cluster = Cluster(replicas, balancer)
        cluster.ensure_serving()
        yield cluster
    finally:
        balancer.stop()
        for replica in replicas:
            replica.stop()


@pytest.fixture
def lb(cluster: Cluster) -> Cluster:
    cluster.ensure_serving()
    return cluster


def oversized_post(lb: Cluster, request_id: bytes | None) -> tuple[list[bytes], dict[str, Any]]:
    """The balancer's answer to a body over its limit, refused from the Content-Length alone (no
    body is sent, none is read): its head's lines and its JSON body."""
    id_line = b"X-Request-ID: " + request_id + b"\r\n" if request_id is not None else b""
    with socket.create_connection(("127.0.0.1", lb.balancer.port), timeout=5) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: fusion.test\r\n" + id_line + b"Content-Type: multipart/form-data;"
            b" boundary=x\r\nContent-Length: 20971521\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), json.loads(body)


def test_oversized_body_is_refused_by_the_balancer_with_the_request_id(lb: Cluster) -> None:
    """In the service's shape, and with the client's id in the header and the body (JSON-escaped),
    as the service would answer; a fresh id, the same in both, when the client sent none."""
    for sent in (b'client"7\\x', None):
        lines, body = oversized_post(lb, sent)
        assert lines[0] == b"HTTP/1.1 413 Request Entity Too Large", lines
        ids = [line.split(b": ", 1)[1] for line in lines if line.lower().startswith(b"x-request-id:")]
        expected = sent.decode() if sent is not None else ids[0].decode()
        assert body == {
            "error": {
                "code": "payload_too_large",
                "message": "the request body exceeds 20971520 bytes",
                "request_id": expected,
            }
        }
        assert ids == [expected.encode()]
        if sent is None:
            assert UUID.fullmatch(expected), expected


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def test_request_id_is_set_by_the_balancer_unless_the_client_sent_one(lb: Cluster) -> None:
    image = png_bytes()

    def predict(client: httpx.Client, headers: dict[str, str]) -> httpx.Response:
        files = {"image": ("q.png", image, "image/png")}
        return client.post("/predict", files=files, data={"text": PREDICT_TEXT}, headers=headers)

    with httpx.Client(base_url=lb.balancer.url, timeout=20) as client:
        generated = predict(client, {})
        echoed = predict(client, {"X-Request-ID": "client-chosen-42"})
    assert generated.status_code == echoed.status_code == 200
    # HAProxy's id (a UUID, also in its log line), echoed by the replica.
    assert UUID.fullmatch(generated.headers["x-request-id"]), generated.headers
    assert echoed.headers["x-request-id"] == "client-chosen-42"


def test_sigterm_one_replica_loses_no_request(lb: Cluster) -> None:
    victim = lb.replicas[0]
    retries = lb.balancer.retries()
    with Load(lb.balancer.url) as load:
        load.wait_answered(40)
        assert victim.predict_requests() > 0, "the victim was not in rotation"
        victim.send(signal.SIGTERM)
        lb.balancer.wait_status(victim.name, "DOWN")
        code = victim.wait_exit()
        load.keep_going(0.5)
    retried = lb.balancer.retries() - retries
    text = summary("SIGTERM one replica", load, retried)
    assert code == 0, log_tail(victim.log_path)
    assert not load.failures(), text
    # Not even saved by a retry: HAProxy stopped sending before the listener closed.
    assert retried == 0, text


def test_sigkill_one_replica_fails_only_requests_in_flight(lb: Cluster) -> None:
    victim = lb.replicas[1]
    retries = lb.balancer.retries()
    with Load(lb.balancer.url) as load:
        load.wait_answered(40)
        assert victim.predict_requests() > 0, "the victim was not in rotation"
        killed_at = victim.send(signal.SIGKILL)
        victim.wait_exit()
        down_at = lb.balancer.wait_status(victim.name, "DOWN")
        load.keep_going(1.0)
    failures = load.failures()
    text = summary("SIGKILL one replica", load, lb.balancer.retries() - retries)
    log.info("SIGKILL: haproxy marked it down %.2f s after the kill", down_at - killed_at)
    # Only requests already sent when it died may fail (each client has one in flight at most);
    # everything sent later, before and after the health check noticed, is retried elsewhere.
    assert len(failures) <= WORKERS, text
    assert all(failure.started <= killed_at for failure in failures), text


def test_rolling_restart_loses_no_request(lb: Cluster) -> None:
    retries = lb.balancer.retries()
    with Load(lb.balancer.url) as load:
        load.wait_answered(40)
        for replica in lb.replicas:
            replica.send(signal.SIGTERM)
            lb.balancer.wait_status(replica.name, "DOWN")
            assert replica.wait_exit() == 0, log_tail(replica.log_path)
            lb.restart(replica)
        load.keep_going(1.0)
        served = {replica.name: replica.predict_requests() for replica in lb.replicas}
    retried = lb.balancer.retries() - retries
    text = summary("rolling restart", load, retried)
    assert not load.failures(), text
    assert retried == 0, text
    # Every new process is back in rotation.
    assert all(count > 0 for count in served.values()), served


def test_replica_alive_but_not_ready_receives_nothing(lb: Cluster) -> None:
    victim = lb.replicas[2]
    # A drain window long enough to watch: SIGTERM makes it alive (serving) but not ready.
    victim.stop()
    lb.restart(victim, drain_delay_s=5.0)
    retries = lb.balancer.retries()
    with Load(lb.balancer.url) as load:
        load.wait_answered(40)
        assert victim.predict_requests() > 0, "the victim was not in rotation"
        victim.send(signal.SIGTERM)
        lb.balancer.wait_status(victim.name, "DOWN")
        time.sleep(0.3)  # requests sent just before it went down finish (each takes milliseconds)
        served_before, sessions_before = victim.predict_requests(), lb.balancer.sessions(victim.name)
        load.keep_going(2.0)
        served_after, sessions_after = victim.predict_requests(), lb.balancer.sessions(victim.name)
        alive, ready = victim.status_of("/healthz"), victim.status_of("/readyz")
        still_running = victim.running
    text = summary("alive but not ready", load, lb.balancer.retries() - retries)
    log.info("alive but not ready: /predict answered by it in 2 s: %d", served_after - served_before)
    assert still_running and (alive, ready) == (200, 503), "the victim left its drain window too early"
    assert served_after == served_before, "a replica that is not ready was sent requests"
    assert sessions_after == sessions_before, "haproxy opened connections to a replica that is not ready"
    assert not load.failures(), text
