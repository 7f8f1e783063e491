"""The request body budget: how many bytes of request bodies one process holds at once.

A request holds its body from the first byte until it is decoded; from then on only the model's
inputs go on (a few tens of KiB). Every admitted request (up to --max-queue) could hold a body at
once: under a burst of photo uploads, 256 bodies of 5 MB are 1.3 GB, past a 2 GiB replica's limit
beside the model. So each body counts here, twice over (while it is decoded, its parts are
copies beside it), as it arrives: a body whose declared Content-Length would not fit is refused
with 429 and Retry-After, as other overload is, before a byte is read; one that stops fitting
while it arrives (a chunked one, or several arriving at once), when it does. Counting what has
arrived, not what is declared, keeps a client that declares 20 MB and trickles from holding a
share it has not sent.

Only the event loop reads bodies and gives them back: no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from app.config import MiB
from app.errors import Overloaded
from app.metrics import Metrics

COPIES = 2  # the body, and the copies of its parts that parsing makes while it is decoded


class BodyMemory:
    def __init__(self, capacity_bytes: int, metrics: Metrics, retry_after_s: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.held_bytes = 0
        self._metrics = metrics
        self._retry_after_s = retry_after_s

    @contextmanager
    def hold(self, declared: int | None) -> Iterator[BodyHold]:
        """What one request's body holds as it arrives, given back on leaving the block; 429 at
        once when its declared length would not fit now."""
        if declared is not None:
            self._check(COPIES * declared)
        held = BodyHold(self)
        try:
            yield held
        finally:
            self._give(held.bytes)

    def _check(self, size: int) -> None:
        if self.held_bytes + size > self.capacity_bytes:
            self._metrics.shed.labels("body_memory").inc()
            raise Overloaded(
                f"the server holds {self.held_bytes / MiB:.1f} MiB for request bodies, of at most"
                f" {self.capacity_bytes / MiB:.0f} MiB: this one does not fit now",
                retry_after_s=self._retry_after_s,
            )

    def _take(self, size: int) -> None:
        self._check(size)
        self.held_bytes += size
        self._metrics.body_memory.set(self.held_bytes)

    def _give(self, size: int) -> None:
        self.held_bytes -= size
        self._metrics.body_memory.set(self.held_bytes)


class BodyHold:
    """One request's share: what has arrived of its body, twice."""

    def __init__(self, memory: BodyMemory) -> None:
        self._memory = memory
        self.bytes = 0

    def arrived(self, size: int) -> None:
        """`size` bytes of the body have arrived in all."""
        needed = COPIES * size
        if needed > self.bytes:
            self._memory._take(needed - self.bytes)
            self.bytes = needed
