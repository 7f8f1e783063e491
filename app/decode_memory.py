"""The decode memory budget: how many bytes the decode pool's images may hold at once.

A compressed image's size says little about what decoding it takes: a 1.6 MB PNG of 50 megapixels
with transparency grows to 955 MiB while it is converted to RGB (model.preprocess.decode_bytes),
and two such decodes at once would take a 2 GiB replica past its memory limit, where the kernel
kills it with every request it holds. So each decode in the pool first holds its estimated bytes
here, and waits, in arrival order, while the images already decoding hold too much; it waits no
longer than its request's deadline (then 504). An image that alone needs more than the whole
budget is refused (413) before a pixel is decoded. The budget is per process: each front-end of
`--frontends N` has its own pool and its own budget.

Decodes on the event loop (small images, app.routes.common) are not counted: they are bounded by
--inline-decode-pixels, and the loop must never wait.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from collections.abc import Callable

from app.config import MiB
from app.errors import DeadlineExceeded, DecodeTooLarge
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


class DecodeMemory:
    def __init__(self, capacity_bytes: int, metrics: Metrics) -> None:
        self.capacity_bytes = capacity_bytes
        self._metrics = metrics
        self._held = 0
        self._changed = threading.Condition()
        self._waiting: deque[object] = deque()  # one token per waiting decode, first come first

    @property
    def held_bytes(self) -> int:
        return self._held

    def hold(self, size: tuple[int, int], needed: int, deadline: float | None) -> int:
        """Block the calling decode thread until `needed` bytes fit, then hold them; give them back
        with release(). `deadline` is on the time.monotonic() clock; None waits as long as it takes."""
        if needed > self.capacity_bytes:
            raise DecodeTooLarge(
                f"the image ({size[0]}x{size[1]}) would take {needed / MiB:.0f} MiB to decode; this server"
                f" decodes images of at most {self.capacity_bytes / MiB:.0f} MiB (send it smaller, or as JPEG)"
            )
        with self._changed:
            if not self._waiting and self._held + needed <= self.capacity_bytes:
                return self._take(needed)
            token = object()
            self._waiting.append(token)
            self._metrics.decode_memory_waits.inc()
            try:
                # First come first served: a large image is not passed over for ever by small ones.
                fits = self._changed.wait_for(
                    lambda: self._waiting[0] is token and self._held + needed <= self.capacity_bytes,
                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
                )
            finally:
                self._waiting.remove(token)
                self._changed.notify_all()  # the next in line may fit now, or be first
            if not fits:
                self._metrics.expired.labels("decode_memory").inc()
                raise DeadlineExceeded("the deadline passed while the image waited for decode memory")
            return self._take(needed)

    def release(self, held: int) -> None:
        if held >= TRIM_AFTER_BYTES:
            _return_free_memory()
        with self._changed:
            self._held -= held
            self._metrics.decode_memory.set(self._held)
            self._changed.notify_all()

    def _take(self, needed: int) -> int:
        self._held += needed
        self._metrics.decode_memory.set(self._held)
        return needed
