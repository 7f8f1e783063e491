"""bench.loadgen against a small in-test HTTP server: framing, counting, and no coordinated omission."""

from __future__ import annotations

import asyncio
import math
import socket
import time

from bench import loadgen

REQUEST = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"


async def serve(
    gate: asyncio.Event | None = None, chunked: bool = False, keep_alive_s: float | None = None
) -> tuple[asyncio.Server, int]:
    """Answers every request 200 (or 404 for /missing); holds all answers until `gate` is set;
    closes a connection idle for `keep_alive_s`, as uvicorn does."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), keep_alive_s)
                except TimeoutError:
                    return
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                if gate is not None:
                    await gate.wait()
                status = b"404 Not Found" if head.startswith(b"POST /missing") else b"200 OK"
                if chunked:
                    writer.write(b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 5\r\n\r\nhello")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_closed_loop_counts_statuses_and_reads_both_framings() -> None:
    async def go(chunked: bool) -> loadgen.RunResult:
        server, port = await serve(chunked=chunked)
        async with server:
            missing = REQUEST.replace(b"/x", b"/missing")
            return await loadgen.closed_loop("127.0.0.1", port, [REQUEST, missing], 3, count=40, expected=[200, 200])

    for chunked in (False, True):
        result = asyncio.run(go(chunked))
        assert result.completed == 40
        assert result.status_counts() == {200: 20, 404: 20}
        assert set(zip(result.indices, result.statuses, strict=True)) == {(0, 200), (1, 404)}  # who got which
        assert result.unexpected == 20  # the 404s were expected to be 200
        assert result.connections == 3  # keep-alive: one connection each
        assert result.connection_errors == 0
        assert all(0 < latency < 1 for latency in result.latencies)


def test_open_loop_latency_counts_from_the_intended_send_time() -> None:
    """One connection and a server that answers nothing for 0.4 s: requests due meanwhile wait in the
    generator, and their latency must include that wait (a closed-loop generator would hide it)."""

    async def go() -> loadgen.RunResult:
        gate = asyncio.Event()
        server, port = await serve(gate)
        async with server:
            asyncio.get_running_loop().call_later(0.4, gate.set)
            return await loadgen.open_loop(
                "127.0.0.1", port, [REQUEST], rate=50, duration_s=1.0, seed=3, max_connections=1, drain_s=5
            )

    began = time.perf_counter()
    result = asyncio.run(go())
    schedule = loadgen.poisson_schedule(50, 1.0, 3)
    assert result.completed == len(schedule) and result.unanswered == 0
    assert set(result.statuses) == {200}
    # The first request was due at schedule[0] and answered at ~0.4 s.
    assert max(result.latencies) >= 0.4 - schedule[0] - 0.05
    early = [s for s in schedule if s < 0.3]
    late_enough = [latency for latency in result.latencies if latency >= 0.1]
    assert len(late_enough) >= len(early) - 1
    assert time.perf_counter() - began < 5


def test_open_loop_does_not_reuse_a_connection_the_server_closes_as_idle() -> None:
    """A server that closes connections idle for 1 s, and gaps between arrivals longer than that:
    a generator that reused them would count connection errors the server never caused."""
    rate, duration_s, seed = 1.0, 5.0, 1
    schedule = loadgen.poisson_schedule(rate, duration_s, seed)
    assert max(later - earlier for earlier, later in zip(schedule, schedule[1:], strict=False)) > 1.4

    async def go(stale_after_s: float) -> loadgen.RunResult:
        server, port = await serve(keep_alive_s=1.0)
        async with server:
            return await loadgen.open_loop(
                "127.0.0.1", port, [REQUEST], rate, duration_s, seed=seed, drain_s=5, stale_after_s=stale_after_s
            )

    result = asyncio.run(go(stale_after_s=0.1))
    assert (result.completed, result.connection_errors) == (len(schedule), 0)
    reused = asyncio.run(go(stale_after_s=math.inf))  # what the generator did before
    assert reused.connection_errors >= 1
    assert sum(reused.error_kinds.values()) == reused.connection_errors
    assert set(reused.error_kinds) <= {"IncompleteReadError", "ConnectionResetError", "BrokenPipeError"}


def test_open_loop_counts_refused_connections_without_using_up_its_connections() -> None:
    """Nothing listens: every request fails at once as refused; a refused connect must give its
    slot back, or after `max_connections` of them the rest would wait, unanswered, to the end."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed on leaving: nothing listens there
    rate, duration_s, seed = 40.0, 0.5, 2
    schedule = loadgen.poisson_schedule(rate, duration_s, seed)
    assert len(schedule) > 4

    async def go() -> loadgen.RunResult:
        return await loadgen.open_loop(
            "127.0.0.1", port, [REQUEST], rate, duration_s, seed=seed, max_connections=2, drain_s=2
        )

    result = asyncio.run(go())
    assert (result.connection_errors, result.unanswered, result.completed) == (len(schedule), 0, 0)
    assert result.error_kinds == {"ConnectionRefusedError": len(schedule)}


def test_closed_loop_counts_refused_connections_and_runs_to_its_end() -> None:
    """A server that is gone (it crashed mid-run, say) is counted as failed connections, one per
    request tried; the run still ends as planned, so the measurements before it stand."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed on leaving: nothing listens there

    result = asyncio.run(loadgen.closed_loop("127.0.0.1", port, [REQUEST], 2, count=6))
    assert (result.connection_errors, result.completed, result.connections) == (6, 0, 0)
    assert result.error_kinds == {"ConnectionRefusedError": 6}


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert loadgen.percentile(values, 50) == 50
    assert loadgen.percentile(values, 99) == 99
    assert loadgen.percentile(values, 100) == 100
    assert loadgen.percentile([], 50) != loadgen.percentile([], 50)  # NaN
