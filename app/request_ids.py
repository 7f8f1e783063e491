"""Request IDs for requests that arrive without one: a random per-process prefix and a counter.

`uuid.uuid4()` reads the OS's random source, and CPython releases the GIL around that system
call; on the event-loop thread, getting the GIL back means waiting for the decode or inference
thread to yield it (up to the switch interval, `--switch-interval-ms`). Profiled under load (at
Python's 5 ms interval), uuid4 took a sixth of the event loop's busy time. A counter needs no
system call; the prefix keeps IDs from different processes and restarts apart, and the result
has uuid4's shape: 32 lowercase hex digits.
"""

from __future__ import annotations

import itertools
import os
import secrets


class _Sequence:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = secrets.token_hex(8)  # 16 hex digits
        self.counter = itertools.count(1)


_SEQUENCE = _Sequence()
# A forked child must not repeat its parent's IDs.
os.register_at_fork(after_in_child=_SEQUENCE.reset)


def new_request_id() -> str:
    # next() on itertools.count is atomic under the GIL, so concurrent callers never share a value.
    return f"{_SEQUENCE.prefix}{next(_SEQUENCE.counter):016x}"
