"""The decode pool: threads that parse, decode and validate requests, at a lower CPU priority.

On a busy CPU host every core is shared by the inference thread, the event loop and the decode
threads. Each time the kernel gave a core to a decode thread while the forward pass was runnable,
the batch waited: on the benchmark's mix at concurrency 32, a fuse batch took 1.24x its own CPU
time on the wall, with 9-14 involuntary context switches per batch (5-8 at nice +10). The device
is the resource to keep busy, so the decode threads run at a higher nice value than the rest of
the process (Linux keeps a nice value per thread): the kernel then hands them the cycles the
forward pass and the event loop leave, which under load is a whole core on two. When the CPU is
idle, a lower priority costs nothing.

Lowering a priority needs no privilege; raising the inference thread's would (CAP_SYS_NICE).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from app.config import Settings

log = logging.getLogger(__name__)

MAX_NICE = 19  # the kernel's lowest priority


def decode_nice_in_force(settings: Settings) -> int:
    """--decode-nice where it applies: elsewhere than Linux, nice is per process, not per thread."""
    return settings.decode_nice if sys.platform == "linux" else 0


def start_decode_pool(settings: Settings) -> ThreadPoolExecutor:
    increment = decode_nice_in_force(settings)
    if settings.decode_nice and not increment:
        log.info("--decode-nice has no effect on %s (per-thread priorities are Linux only)", sys.platform)
    return ThreadPoolExecutor(
        settings.decode_threads(),
        thread_name_prefix="decode",
        initializer=partial(lower_thread_priority, increment) if increment else None,
    )


def lower_thread_priority(increment: int) -> None:
    """Make the calling thread `increment` nicer than it is (at most 19), not than nice 0: a service
    started under `nice` keeps its decode threads below its own other threads all the same.

    Never raises: a pool whose initializer raised would refuse every request, and a sandbox that
    forbids the call (a seccomp profile) only costs the priority."""
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)  # on Linux, PRIO_PROCESS with a thread id: that thread
        os.setpriority(os.PRIO_PROCESS, thread, min(MAX_NICE, current + increment))
    except OSError as exc:
        log.warning("a decode thread keeps its priority: setpriority failed (%s)", exc)
