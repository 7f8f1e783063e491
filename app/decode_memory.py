"""The decode memory budget: how many bytes the decode pool's images may hold at once.

A compressed image's size says little about what decoding it takes: a 1.6 MB PNG of 50 megapixels
with transparency grows to 955 MiB while it is converted to RGB (model.preprocess.decode_bytes),
and two such decodes at once would take a 2 GiB replica past its memory limit, where the kernel
kills it with every request it holds. So each decode in the pool first holds its estimated bytes
here. One that does not fit, or would pass images already waiting, gives its thread back and
waits on the event loop, in arrival order, no longer than its request's deadline (then 504); it
is then decoded with its bytes held for it. A waiting image never holds a pool thread, so the
requests without a large image behind it are decoded meanwhile. An image that alone needs more
than the whole budget is refused (413) before a pixel is decoded. The budget is per process:
each front-end of `--frontends N` has its own pool and its own budget.

Decodes on the event loop (small images, app.routes.common) are not counted: they are bounded by
--inline-decode-pixels, and the loop must never wait.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from asyncio import FIRST_COMPLETED
from collections import deque
from collections.abc import Callable

from app.config import MiB
from app.errors import ClientGone, DeadlineExceeded, DecodeTooLarge
from app.metrics import Metrics

TRIM_AFTER_BYTES = 64 * MiB


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where the process has it (not on musl, macOS or Windows)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


_MALLOC_TRIM = _malloc_trim()


def _return_free_memory() -> None:
    """Give the freed heap pages of every thread's malloc arena back to the kernel.

    Each decode thread allocates from a malloc arena of its own, which keeps what it freed: without
    this, one large image decoded in each thread in turn left each arena that large, and resident
    memory grew with the threads, the budget notwithstanding (two threads, four 20-megapixel
    transparent PNGs one at a time: +736 MiB at the peak, +383 MiB with it, against 389 MiB held)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class MustWait(Exception):
    """The image's decode memory is not free now: wait for it on the event loop (DecodeMemory.wait)."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


class DecodeMemory:
    def __init__(self, capacity_bytes: int, metrics: Metrics, loop: asyncio.AbstractEventLoop) -> None:
        self.capacity_bytes = capacity_bytes
        self._metrics = metrics
        self._loop = loop
        self._held = 0
        self._lock = threading.Lock()  # decode threads take and give back; the loop hands out to waiters
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()  # first come, first served

    @property
    def held_bytes(self) -> int:
        return self._held

    def take(self, size: tuple[int, int], needed: int) -> None:
        """In a decode thread: hold `needed` bytes now (give them back with release()), or raise
        MustWait: they do not fit, or images are waiting already (a large image is not passed over
        for ever by small ones). 413 for more than the whole budget."""
        if needed > self.capacity_bytes:
            raise DecodeTooLarge(
                f"the image ({size[0]}x{size[1]}) would take {needed / MiB:.0f} MiB to decode; this server"
                f" decodes images of at most {self.capacity_bytes / MiB:.0f} MiB (send it smaller, or as JPEG)"
            )
        with self._lock:
            if self._waiting or self._held + needed > self.capacity_bytes:
                raise MustWait(needed)
            self._add(needed)

    async def wait(self, needed: int, deadline: float, gone: asyncio.Future[None] | None = None) -> None:
        """On the event loop: wait in line until `needed` bytes are held for this request, until
        `deadline` (the loop's clock) at most (504), or until `gone` completes, the client having
        disconnected (499): its large image is not decoded for nobody. The decode that uses the
        bytes gives them back."""
        self._metrics.decode_memory_waits.inc()
        granted: asyncio.Future[None] = self._loop.create_future()
        with self._lock:
            self._waiting.append((needed, granted))
        self._hand_out()  # the line may have been empty, and the bytes freed meanwhile
        try:
            async with asyncio.timeout_at(deadline):
                # asyncio.wait cancels neither future: a grant at the deadline is seen, and given back.
                await asyncio.wait([granted] if gone is None else [granted, gone], return_when=FIRST_COMPLETED)
            if not granted.done():
                self._metrics.cancelled.labels("client_disconnected").inc()
                raise ClientGone("the client disconnected while its image waited for decode memory")
        except BaseException as stopped:
            self._leave_line(needed, granted)
            if isinstance(stopped, TimeoutError):
                self._metrics.expired.labels("decode_memory").inc()
                raise DeadlineExceeded("the deadline passed while the image waited for decode memory") from None
            raise

    def _leave_line(self, needed: int, granted: asyncio.Future[None]) -> None:
        """On the loop: a waiter that stops waiting gives back its place, or what it was granted."""
        with self._lock:
            if granted.done():
                self._add(-needed)
            else:
                self._waiting.remove((needed, granted))
        self._hand_out()  # the next in line may fit now

    def release(self, held: int) -> None:
        """From a decode thread, once its decode is over: give back what it held."""
        if held >= TRIM_AFTER_BYTES:
            _return_free_memory()
        self.give_back(held)

    def give_back(self, held: int) -> None:
        """From any thread: give back bytes no decode used (no trim: nothing was allocated)."""
        with self._lock:
            self._add(-held)
            anyone_waiting = bool(self._waiting)
        if anyone_waiting:
            self._loop.call_soon_threadsafe(self._hand_out)

    def _hand_out(self) -> None:
        """On the loop: hold their bytes for the waiters first in line, while they fit."""
        with self._lock:
            while self._waiting and self._held + self._waiting[0][0] <= self.capacity_bytes:
                needed, granted = self._waiting.popleft()
                self._add(needed)
                granted.set_result(None)

    def _add(self, size: int) -> None:
        self._held += size
        self._metrics.decode_memory.set(self._held)
