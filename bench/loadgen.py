"""A raw-socket HTTP/1.1 load generator: closed loop and open loop (Poisson arrivals), no client library.

Requests are pre-built bytes (bench.payloads); a connection writes one, reads the status line and
headers, then exactly Content-Length bytes (or the chunks), and reuses the connection (keep-alive).
Nothing is parsed beyond what framing needs, so the generator costs tens of microseconds of CPU
per request; every run reports its own CPU time (`generator_cpu_s`) so the report can show that it
is far below the server's.

Open loop: arrival times are drawn in advance (exponential gaps at the offered rate); each request
is sent at its time on an idle connection, or a new one (up to `max_connections`), and its latency
counts from the *intended* send time, so a stalled server cannot slow the generator down into
reporting good numbers (no coordinated omission: the wrk2 rule). How late the generator itself was
(`send_lag`) is recorded too: if it grows, the generator, not the server, was the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import statistics
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Latencies:
    """A closed-loop run as the report reads it, whichever generator made it (seconds)."""

    requests: int
    elapsed_s: float
    throughput: float  # answered requests per second
    p50_s: float
    p90_s: float
    p99_s: float
    p999_s: float
    mean_s: float
    max_s: float
    non_2xx: int
    errors: int  # connections that failed: refused, reset, timed out
    generator_cpu_s: float


@dataclass
class RunResult:
    mode: str  # "closed" or "open"
    concurrency: int = 0  # closed loop
    offered_rate: float = 0.0  # open loop, requests/s
    elapsed_s: float = 0.0  # from the first send to the last answer (closed) or the schedule's end (open)
    latencies: list[float] = field(default_factory=list)  # seconds, one per answered request
    statuses: list[int] = field(default_factory=list)  # parallel to latencies
    indices: list[int] = field(default_factory=list)  # parallel to latencies: each one's place in the rotation
    send_lag: list[float] = field(default_factory=list)  # open loop: actual send - intended send
    unanswered: int = 0  # open loop: still without an answer when the drain time ran out
    connection_errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)  # exception name -> count
    unexpected: int = 0  # answers whose status differed from the request's expected one
    generator_cpu_s: float = 0.0
    connections: int = 0

    def count_error(self, exc: BaseException) -> None:
        """A connection that failed (refused, reset, closed before the whole answer), by kind."""
        self.connection_errors += 1
        self.error_kinds[type(exc).__name__] += 1

    @property
    def completed(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def ok_latencies(self) -> list[float]:
        return [latency for latency, status in zip(self.latencies, self.statuses, strict=True) if status == 200]

    def status_counts(self) -> dict[int, int]:
        return dict(Counter(self.statuses))

    def summary(self) -> Latencies:
        latencies = self.latencies
        return Latencies(
            requests=self.completed,
            elapsed_s=self.elapsed_s,
            throughput=self.throughput,
            p50_s=percentile(latencies, 50),
            p90_s=percentile(latencies, 90),
            p99_s=percentile(latencies, 99),
            p999_s=percentile(latencies, 99.9),
            mean_s=statistics.fmean(latencies) if latencies else float("nan"),
            max_s=max(latencies, default=float("nan")),
            non_2xx=sum(status != 200 for status in self.statuses),
            errors=self.connection_errors,
            generator_cpu_s=self.generator_cpu_s,
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# An open loop's idle connection older than this is closed, not reused: the server closes idle
# keep-alive connections after 5 s (uvicorn's default), and a request written to one it is closing
# fails as a connection error, the generator's race rather than the server's failure.
STALE_AFTER_S = 4.0


class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0  # time.perf_counter() when it last went back to the idle pool

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> tuple[int, bool]:
        """Send one request, read its whole answer; (status, the server keeps the connection)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = -1
        chunked = False
        keep = True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length >= 0:
            await self.reader.readexactly(length)
        else:
            await self.reader.read()  # no framing: the body runs to the end of the connection
            keep = False
        return status, keep

    def close(self) -> None:
        self.writer.close()


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on uvloop when it is installed (lower per-request cost), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(make())  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(make())  # type: ignore[arg-type]


async def closed_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    concurrency: int,
    *,
    duration_s: float | None = None,
    count: int | None = None,
    expected: Sequence[int] | None = None,
    on_answer: Callable[[int], None] | None = None,
    start_index: int = 0,
) -> RunResult:
    """`concurrency` connections, each sending the rotation's next request as soon as it has its answer.

    Stops after `duration_s` or once `count` requests were sent, whichever comes first.
    `on_answer(n)` is called after the n-th answer (for sampling the server while it runs).
    """
    if duration_s is None and count is None:
        raise ValueError("give a duration or a count")
    result = RunResult("closed", concurrency=concurrency)
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    end = math.inf if duration_s is None else clock() + duration_s
    limit = math.inf if count is None else count
    state = {"sent": 0, "answered": 0}
    cpu = time.process_time()

    async def worker() -> None:
        conn: _Connection | None = None
        try:
            while state["sent"] < limit and clock() < end:
                index = (start_index + state["sent"]) % len(requests)
                state["sent"] += 1
                if conn is None:
                    try:
                        conn = await _Connection.open(host, port)
                    except OSError as exc:  # refused: the server is gone or restarting; counted, not fatal
                        result.count_error(exc)
                        await asyncio.sleep(0.01)
                        continue
                    result.connections += 1
                began = clock()
                try:
                    status, keep = await conn.exchange(requests[index])
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    result.count_error(exc)
                    conn.close()
                    conn = None
                    continue
                result.latencies.append(clock() - began)
                result.statuses.append(status)
                result.indices.append(index)
                if expected is not None and status != expected[index]:
                    result.unexpected += 1
                if not keep:
                    conn.close()
                    conn = None
                state["answered"] += 1
                if on_answer is not None:
                    on_answer(state["answered"])
        finally:
            if conn is not None:
                conn.close()

    began = clock()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed_s = clock() - began
    result.generator_cpu_s = time.process_time() - cpu
    return result


def poisson_schedule(rate: float, duration_s: float, seed: int) -> list[float]:
    """Send offsets (seconds from the start) of a Poisson process at `rate` per second."""
    rng = random.Random(seed)
    times = []
    now = rng.expovariate(rate)
    while now < duration_s:
        times.append(now)
        now += rng.expovariate(rate)
    return times


async def open_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate: float,
    duration_s: float,
    *,
    seed: int = 0,
    max_connections: int = 512,
    drain_s: float = 10.0,
    expected: Sequence[int] | None = None,
    stale_after_s: float = STALE_AFTER_S,
) -> RunResult:
    """Poisson arrivals at `rate`/s for `duration_s`; latency from each request's intended send time.
    Idle connections are reused most recent first, and closed once idle `stale_after_s`."""
    result = RunResult("open", offered_rate=rate)
    loop = asyncio.get_running_loop()
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    idle: list[_Connection] = []
    waiting: deque[asyncio.Future[_Connection]] = deque()
    opened = 0

    async def connect_for(waiter: asyncio.Future[_Connection]) -> None:
        nonlocal opened
        try:
            conn = await _Connection.open(host, port)
        except OSError as exc:
            opened -= 1  # the slot is free again: a refused connect must not use it up for the run
            if not waiter.done():
                waiter.set_exception(exc)
            elif waiting:  # this connect was for a waiter since served: try for the next one
                opened += 1
                loop.create_task(connect_for(waiting.popleft()))
            return
        result.connections += 1
        if waiter.done():
            release(conn)
        else:
            waiter.set_result(conn)

    async def acquire() -> _Connection:
        nonlocal opened
        while idle:
            conn = idle.pop()
            if clock() - conn.idle_since < stale_after_s:
                return conn
            conn.close()  # the server may be closing it: a fresh one below instead
            opened -= 1
        waiter: asyncio.Future[_Connection] = loop.create_future()
        if opened < max_connections:
            opened += 1
            loop.create_task(connect_for(waiter))
        else:
            waiting.append(waiter)
        return await waiter

    def release(conn: _Connection) -> None:
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = clock()
        idle.append(conn)

    def discard(conn: _Connection) -> None:
        nonlocal opened
        conn.close()
        opened -= 1
        if waiting:  # someone waits for a connection: open the replacement for them
            opened += 1
            loop.create_task(connect_for(waiting.popleft()))

    async def one(index: int, intended: float) -> None:
        request = requests[index % len(requests)]
        try:
            conn = await acquire()
        except OSError as exc:
            result.count_error(exc)
            return
        result.send_lag.append(clock() - intended)
        try:
            status, keep = await conn.exchange(request)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            result.count_error(exc)
            discard(conn)
            return
        result.latencies.append(clock() - intended)
        result.statuses.append(status)
        result.indices.append(index % len(requests))
        if expected is not None and status != expected[index % len(expected)]:
            result.unexpected += 1
        if keep:
            release(conn)
        else:
            discard(conn)

    schedule = poisson_schedule(rate, duration_s, seed)
    cpu = time.process_time()
    start = clock()
    tasks: list[asyncio.Task[Any]] = []
    for index, offset in enumerate(schedule):
        intended = start + offset
        delay = intended - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(index, intended)))
    result.elapsed_s = max(clock() - start, duration_s)
    if tasks:
        done, pending = await asyncio.wait(tasks, timeout=drain_s)
        result.unanswered = len(pending)
        for task in pending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)
    for conn in idle:
        conn.close()
    result.generator_cpu_s = time.process_time() - cpu
    return result
