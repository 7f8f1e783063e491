"""`--frontends N` end to end: one replica of several processes on one port, over real sockets.

Which process accepts a connection is the kernel's choice, so each test sends enough requests on
fresh connections that the front-ends serve (the device counts what they hand over), and asserts
what must hold whichever process answered: the same answers as a replica of one process, exact
counts in /metrics from any process, restarts, the drain, and the end of the device process.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.lateness_limit import deadline_class, gauge_label
from tests.app.conftest import form, metric, picture
from tests.app.servers import SERVER_ARGS, Server, running_server, start_server

pytestmark = pytest.mark.slow

FRONTENDS = ("--frontends", "3")  # the device process and two front-ends


def frontend_pids(server: Server) -> dict[int, int]:
    """Front-end index -> the pid it last started with, from the device process's log."""
    return {int(i): int(pid) for i, pid in re.findall(r"front-end (\d+) started \(pid (\d+)\)", server.output())}


def wait_frontends(server: Server, serving: int = 2, timeout_s: float = 60) -> None:
    """Until `serving` front-ends have said they serve through the device process, and are linked."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        said = len(re.findall(r"serving \S+ \S+ through the device process", server.output()))
        if said >= serving and metric(server.metrics(), "fusion_frontends_connected") == 2:
            return
        time.sleep(0.05)
    raise AssertionError(f"the front-ends did not come up:\n{server.output()}")


def alive(pid: int) -> bool:
    """Running, not a zombie (a front-end whose device process died is reaped by init, some time later)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def fresh(url: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request on a connection of its own: the kernel picks the process anew each time."""
    with httpx.Client(base_url=url, timeout=30, headers={"Connection": "close"}) as client:
        return client.request(method, path, **kwargs)


def answers(url: str) -> list[tuple[int, Any]]:
    """What a replica answers to a fixed set of requests, request ids left out."""
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/predict", form(picture(), "What shape is it?")),
        ("POST", "/predict", form(picture(color=(10, 200, 30)), "Quelle forme ?", top_k="2")),
        ("POST", "/embed", form(picture(), "a red square")),
        ("POST", "/embed", form(text="text alone")),
        ("POST", "/embed", form(picture(fmt="JPEG"))),
        ("POST", "/predict", form(picture(), "!boom")),  # the model fails on this item alone: 500
        ("POST", "/predict", form(b"not an image", "q")),  # 415 from the decoder
    ]
    got = []
    for method, path, kwargs in requests:
        response = fresh(url, method, path, **kwargs)
        body = response.json()
        if "error" in body:
            body["error"].pop("request_id")
        got.append((response.status_code, body))
    return got


@pytest.fixture(scope="module")
def single(probe_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(probe_package, tmp_path_factory.mktemp("single"), *SERVER_ARGS) as running:
        yield running


@pytest.fixture
def replica(probe_package: Path, tmp_path: Path) -> Iterator[Server]:
    with running_server(probe_package, tmp_path, *SERVER_ARGS, *FRONTENDS) as running:
        wait_frontends(running)
        yield running


def test_the_replica_answers_as_one_process_does_and_counts_as_one(single: Server, replica: Server) -> None:
    expected = answers(single.url)
    assert [status for status, _ in expected] == [200, 200, 200, 200, 200, 500, 415]
    for _ in range(4):  # 28 requests on fresh connections: every answer as the single process gave it
        assert answers(replica.url) == expected
    with ThreadPoolExecutor(8) as pool:  # and concurrently, so that batches mix the processes' items
        texts = [f"q{i}" for i in range(24)]
        statuses = list(pool.map(lambda text: fresh(replica.url, "POST", "/predict", **form(picture(), text)), texts))
    assert [r.status_code for r in statuses] == [200] * 24

    infos = {fresh(replica.url, "GET", "/info").text for _ in range(8)}
    assert len(infos) == 1  # every process gives the device process's /info
    info = httpx.Response(200, text=infos.pop()).json()
    assert info["model"]["version"] == "1.2.3-probe" and info["batching"]["frontends"] == 3
    assert {fresh(replica.url, "GET", "/readyz").json()["status"] for _ in range(8)} == {"ready"}

    # Any process's /metrics is the replica's: exact counts, whichever process answered what.
    for _ in range(4):
        samples = replica.metrics()
        assert metric(samples, "fusion_requests_total", route="/predict", status="200") == 4 * 2 + 24
        assert metric(samples, "fusion_requests_total", route="/predict", status="500") == 4
        assert metric(samples, "fusion_requests_total", route="/embed", status="200") == 4 * 3
        assert metric(samples, "fusion_requests_total", route="/predict", status="415") == 4
        assert metric(samples, "fusion_model_failures_total", kind="fuse") == 4
        assert metric(samples, "fusion_frontends_connected") == 2
        assert metric(samples, "fusion_ready") == 1
    # The front-ends did serve: what they handed over ran on the device (the 415s never reach it).
    assert metric(samples, "fusion_handoff_items_total") > 0
    # ... and they did so without the model's runtime: torch is mapped in the device process only
    # (importing it would cost each front-end about 280 MB and over a second of its start).
    assert torch_libraries(replica.process.pid)
    assert [torch_libraries(pid) for pid in frontend_pids(replica).values()] == [set(), set()]


def torch_libraries(pid: int) -> set[str]:
    """The shared libraries of torch that a process has mapped."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in maps if "/torch/lib/" in line}


def test_a_killed_front_end_is_started_again_and_the_replica_keeps_serving(replica: Server) -> None:
    before = metric(replica.metrics(), "fusion_requests_total", route="/readyz", status="200")
    old = frontend_pids(replica)[1]
    os.kill(old, signal.SIGKILL)
    end = time.monotonic() + 30
    while frontend_pids(replica)[1] == old and time.monotonic() < end:
        time.sleep(0.05)
    assert frontend_pids(replica)[1] != old, replica.output()
    wait_frontends(replica, serving=3)
    samples = replica.metrics()
    assert metric(samples, "fusion_frontend_restarts_total") == 1
    assert metric(samples, "fusion_requests_total", route="/readyz", status="200") >= before  # never backwards
    statuses = [fresh(replica.url, "POST", "/predict", **form(picture(), f"after {i}")).status_code for i in range(12)]
    assert statuses == [200] * 12


def test_sigterm_drains_every_process_and_loses_no_accepted_request(probe_package: Path, tmp_path: Path) -> None:
    drain_delay = 2.0
    args = (*SERVER_ARGS[:-2], "--drain-delay-s", str(drain_delay), *FRONTENDS)
    with running_server(probe_package, tmp_path, *args) as server:
        wait_frontends(server)
        children = list(frontend_pids(server).values())
        stop_sending = threading.Event()
        outcomes: list[int | str] = []

        def steady_client(i: int) -> None:
            while not stop_sending.is_set():
                try:
                    outcomes.append(fresh(server.url, "POST", "/predict", **form(picture(), f"steady {i}")).status_code)
                except httpx.TransportError as exc:
                    outcomes.append(type(exc).__name__)

        with ThreadPoolExecutor(16) as pool:
            steady = [pool.submit(steady_client, i) for i in range(4)]
            time.sleep(0.5)
            sigterm_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            time.sleep(drain_delay / 2)
            stop_sending.set()  # the load balancer has seen /readyz 503
            # Accepted just before the listeners close: slow batches that finish after it.
            slow_forms = [form(picture(), "#" * 60 + str(i)) for i in range(8)]
            slow = [pool.submit(fresh, server.url, "POST", "/predict", **one) for one in slow_forms]
            for future in steady:
                future.result()
            slow_statuses = [future.result().status_code for future in slow]
        exit_code = server.process.wait(timeout=30)
        exited_at = time.monotonic()

    assert exit_code == 0, server.output()
    assert outcomes and set(outcomes) == {200}
    assert slow_statuses == [200] * 8
    assert not any(alive(pid) for pid in children)
    assert exited_at - sigterm_at < drain_delay + 10
    assert "killing them" not in server.output()


def test_the_front_ends_stop_when_the_device_process_dies(probe_package: Path, tmp_path: Path) -> None:
    server = start_server(probe_package, tmp_path, *SERVER_ARGS, *FRONTENDS)
    try:
        server.wait_ready()
        wait_frontends(server)
        children = list(frontend_pids(server).values())
        server.process.kill()
        server.process.wait()
        end = time.monotonic() + 15
        while any(alive(pid) for pid in children) and time.monotonic() < end:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in children), server.output()
        assert server.output().count("the device process has gone: this front-end stops") == 2
    finally:
        server.stop()


def test_a_second_signal_skips_the_rest_of_the_drain_in_every_process(probe_package: Path, tmp_path: Path) -> None:
    args = (*SERVER_ARGS[:-2], "--drain-delay-s", "30", *FRONTENDS)
    with running_server(probe_package, tmp_path, *args) as server:
        wait_frontends(server)
        children = list(frontend_pids(server).values())
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert {fresh(server.url, "GET", "/readyz").status_code for _ in range(6)} == {503}  # draining, serving
        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        exit_code = server.process.wait(timeout=20)
        took = time.monotonic() - began
    # uvicorn re-raises a signal it handled itself once the server is down (the first one, the
    # drain's, is this service's own): the process ends by that second SIGTERM.
    assert exit_code == -signal.SIGTERM, server.output()
    assert "Finished server process" in server.output().rsplit("front-end", 1)[-1]
    assert took < 10  # not the 30 s drain delay of the front-ends
    assert not any(alive(pid) for pid in children)


def test_a_silent_device_process_makes_the_front_ends_dead_until_it_speaks_again(
    probe_package: Path, tmp_path: Path
) -> None:
    """SIGSTOP stands for a device process whose event loop no longer runs: the front-ends keep
    answering, and their /healthz turns 503 once they have heard nothing for 5 s."""
    replica = start_server(probe_package, tmp_path, *SERVER_ARGS, *FRONTENDS, own_session=True)
    try:
        replica.wait_ready()
        wait_frontends(replica)
        replica.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(6.0)
            silent = fresh(replica.url, "GET", "/healthz")
        finally:
            replica.process.send_signal(signal.SIGCONT)
        assert silent.status_code == 503
        assert silent.json()["reason"].startswith("the device process has not answered for ")
        end = time.monotonic() + 10
        while time.monotonic() < end and {fresh(replica.url, "GET", "/healthz").status_code for _ in range(4)} != {200}:
            time.sleep(0.1)
        assert {fresh(replica.url, "GET", "/healthz").status_code for _ in range(4)} == {200}
    finally:
        replica.stop()


def test_a_deadline_holds_for_items_handed_over_by_a_front_end(probe_package: Path, tmp_path: Path) -> None:
    """An item carries the time it has left across the link: queued on the device behind a long
    batch, each late request is answered 504 at its own deadline by whichever process took it, and
    never runs; the batch it waited behind is answered as usual."""
    with running_server(probe_package, tmp_path, *SERVER_ARGS, *FRONTENDS) as server:
        wait_frontends(server)
        ran = metric(server.metrics(), "fusion_items_executed_total", kind="fuse")
        with ThreadPoolExecutor(16) as pool:
            # A text starting with '@' makes the probe model spin about 2 s in one forward pass.
            hold = pool.submit(fresh, server.url, "POST", "/predict", **form(picture(), "@ hold the device"))
            assert until_metric(server, "fusion_items_executed_total", ran + 1, kind="fuse"), server.output()
            before = server.metrics()  # the device is running the long pass now
            late_form = {**form(picture(), "too late"), "headers": {"X-Request-Timeout-Ms": "300"}}
            sent = time.monotonic()
            late = list(pool.map(lambda _: fresh(server.url, "POST", "/predict", **late_form), range(12)))
            answered_within = time.monotonic() - sent
            assert not hold.done(), "the long pass should still be running"
            assert hold.result().status_code == 200
        after = server.metrics()
    assert [(r.status_code, r.json()["error"]["code"]) for r in late] == [(504, "deadline_exceeded")] * 12
    assert answered_within < 1.5  # at their deadlines, not when the pass ahead of them ended
    handed = metric(after, "fusion_handoff_items_total") - metric(before, "fusion_handoff_items_total")
    assert handed >= 1, "no late request reached the device through a front-end"
    assert metric(after, "fusion_items_executed_total", kind="fuse") == ran + 1  # none of them ran
    expired = metric(after, "fusion_requests_expired_total", stage="queue")
    assert expired - metric(before, "fusion_requests_expired_total", stage="queue") == 12
    assert metric(after, "fusion_requests_total", route="/predict", status="504") == 12


def test_every_process_refuses_with_429_before_the_body_while_the_device_queue_is_full(
    probe_package: Path, tmp_path: Path
) -> None:
    """The replica's queue bound is the device's: while it is full, a front-end answers 429 from
    the headers alone, as the device process does, without waiting for a body nobody will run."""
    args = (*SERVER_ARGS, *FRONTENDS, "--max-queue", "2", "--access-log")
    with running_server(probe_package, tmp_path, *args) as server:
        wait_frontends(server)
        for _ in range(5):  # an attempt counts when the queue filled and the device stayed busy throughout
            time.sleep(0.2)  # the front-ends hear that the last attempt's full queue has drained (50 ms)
            counted = full_queue_attempt(server)
            if counted is not None:
                break
        assert counted is not None, "the queue never stayed full through an attempt"
    statuses, shed = counted
    assert statuses == [b"429"] * 12
    assert shed == 12
    assert re.search(r'front-end \d\]: .*"POST /predict HTTP/1.1" 429', server.output()), server.output()[-3000:]


def full_queue_attempt(server: Server) -> tuple[list[bytes], float] | None:
    """Hold the device (about 1 s) and fill the queue behind it (--max-queue 2), then send 12
    requests' headers, never their bodies, on fresh connections: their statuses and the requests
    shed meanwhile; None when the queue did not fill or the hold ended first (a loaded machine).
    Whichever processes took the hold and the queued requests, none of those is refused: a
    front-end's own bound leaves room for the running batch it cannot see start."""
    head = (
        b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 10000000\r\n\r\n"
    )
    ran = metric(server.metrics(), "fusion_items_executed_total", kind="fuse")
    statuses: list[bytes] = []
    shed = 0.0
    with ThreadPoolExecutor(4) as pool:
        # A text starting with '@' makes the probe model spin for most of a second; each '#' adds 3 ms.
        hold = pool.submit(fresh, server.url, "POST", "/predict", **form(picture(), "@" + "#" * 60))
        assert until_metric(server, "fusion_items_executed_total", ran + 1, kind="fuse")  # running now
        queued = [pool.submit(fresh, server.url, "POST", "/predict", **form(picture(), f"q{i}")) for i in range(2)]
        if until_metric(server, "fusion_queue_depth", 2, stage="queue", timeout_s=5) and not hold.done():
            time.sleep(0.1)  # the device pushes a change of state to the front-ends within 50 ms
            before = metric(server.metrics(), "fusion_requests_shed_total", reason="queue_full")
            for _ in range(12):  # fresh connections: the kernel picks the process each time
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                    sock.sendall(head)  # and never the body
                    statuses.append(sock.recv(65536).split(b" ", 2)[1])
            shed = metric(server.metrics(), "fusion_requests_shed_total", reason="queue_full") - before
        busy_throughout = len(statuses) == 12 and not hold.done()
        assert hold.result().status_code == 200
        assert [future.result().status_code for future in queued] == [200, 200]
    return (statuses, shed) if busy_throughout else None


def test_front_ends_refuse_before_the_body_whom_the_devices_lateness_limit_refuses(
    probe_package: Path, tmp_path: Path
) -> None:
    """Six requests allowing 250 ms expire behind a long pass: over 5 % of their deadline class's
    answers late, the device process's limit for the class (129-256 ms) drops to 0.8 of the three
    still in it (the pass and two behind it). It tells its front-ends, and they answer 429 from the
    headers alone, as the device process does, to requests of that class."""
    with running_server(probe_package, tmp_path, *SERVER_ARGS, *FRONTENDS, "--access-log") as server:
        wait_frontends(server)
        for i in range(8):  # each process's first requests are slow: they would expire before the device
            assert fresh(server.url, "POST", "/predict", **form(picture(), f"warm {i}")).status_code == 200
        # An attempt counts when the device stayed busy throughout; each is of a class of its own,
        # since the last one's limit may already refuse its requests, and a tighter one, which the
        # last one's limit does not cap (only looser classes are capped by tighter ones).
        for allowance_ms in (250, 120, 60):
            time.sleep(0.2)
            counted = lateness_attempt(server, allowance_ms)
            if counted is not None:
                break
        assert counted is not None, "no attempt had the device busy throughout and every header answered"
    statuses, limit, shed = counted
    assert limit == 0.8 * 3
    assert statuses == [b"429"] * 12
    assert shed == 12
    assert re.search(r'front-end \d\]: .*"POST /predict HTTP/1.1" 429', server.output()), server.output()[-3000:]


def lateness_attempt(server: Server, allowance_ms: int) -> tuple[list[bytes], float, float] | None:
    """Hold the device (1-2 s) with two requests behind it and six that allow `allowance_ms`
    (fewer than a batch admitted: none is refused by the queue's expected wait); once those are
    answered 504, send 12 requests' headers allowing as much, never their bodies, on fresh
    connections. Their statuses, the class's limit then, and the requests shed as late meanwhile;
    None when the pass ended first (a loaded machine, or one fast enough to spin through it)."""
    head = (
        b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"X-Request-Timeout-Ms: %d\r\nContent-Length: 10000000\r\n\r\n" % allowance_ms
    )
    ran = metric(server.metrics(), "fusion_items_executed_total", kind="fuse")
    statuses: list[bytes] = []
    with ThreadPoolExecutor(12) as pool:
        # A text starting with '@' makes the probe model spin about 2 s in one forward pass.
        hold = pool.submit(fresh, server.url, "POST", "/predict", **form(picture(), "@ hold the device"))
        assert until_metric(server, "fusion_items_executed_total", ran + 1, kind="fuse")  # running now
        patient = [pool.submit(fresh, server.url, "POST", "/predict", **form(picture(), f"p{i}")) for i in range(2)]
        assert until_metric(server, "fusion_queue_depth", 2, stage="queue", timeout_s=5)
        hurried_form = {**form(picture(), "hurried"), "headers": {"X-Request-Timeout-Ms": str(allowance_ms)}}
        hurried = list(pool.map(lambda _: fresh(server.url, "POST", "/predict", **hurried_form), range(6)))
        time.sleep(0.15)  # the device pushes a change of state to the front-ends within 50 ms
        before = server.metrics()
        label = gauge_label(deadline_class(allowance_ms / 1000))
        # Not cut from its ceiling (256 queued and two batches of 8) when a front-end, slowed down,
        # answered a 504 itself: then fewer than six late answers reached the device's count.
        cut = metric(before, "fusion_admission_limit", allowing_ms=label) != 272
        for _ in range(12 if cut and not hold.done() else 0):  # fresh connections: the kernel picks the process
            with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
                sock.sendall(head)  # and never the body
                try:
                    statuses.append(sock.recv(65536).split(b" ", 2)[1])
                except TimeoutError:  # a front-end that has not heard yet waits for the body
                    statuses.append(b"no answer")
        busy_throughout = not hold.done()
        after = server.metrics()
        assert hold.result().status_code == 200
        assert [future.result().status_code for future in patient] == [200] * 2
    if not (cut and busy_throughout) or [r.status_code for r in hurried] != [504] * 6 or b"no answer" in statuses:
        return None
    shed = metric(after, "fusion_requests_shed_total", reason="late") - metric(
        before, "fusion_requests_shed_total", reason="late"
    )
    return statuses, metric(before, "fusion_admission_limit", allowing_ms=label), shed


def until_metric(server: Server, name: str, value: float, timeout_s: float = 30, **labels: str) -> bool:
    """Whether the replica's metric reached `value` (exactly) within the time."""
    end = time.monotonic() + timeout_s
    while metric(server.metrics(), name, **labels) != value:
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)
    return True
