"""MicroBatcher: admission, deadlines and dynamic batching in front of the one inference thread.

    route --admit()--> Ticket            bounded: beyond max_queue admitted requests, 429 at once;
                                          429 too when the work ahead would keep it past its deadline,
                                          or beyond the limit that answers coming late set
                                          (app.lateness_limit); 504 when its deadline has passed
          decode in the pool
          --run()--> lane[kind].filling  rows copied into a preallocated batch buffer on arrival
                                          (or into the lane's overflow when that buffer is full)
    dispatcher: whenever the device is free, the lane with the oldest waiting item gives its
                filling buffer, up to max_batch_size rows, to the inference thread; the lane's
                other buffer starts filling at once (double buffering: the next batch is
                collated while this one runs); with `lookahead_s`, the next batch is handed to
                the inference thread that long before the running one is expected to end (from
                then on its items count as running), and a third buffer fills meanwhile

No added wait when idle (a request dispatches alone at once), full batches under load (the queue
fills while the device is busy); `max_wait_s` optionally holds an idle device for a fuller batch.
When the device frees while admitted requests are still being parsed and decoded, the dispatcher
waits up to `gather_s` for them: otherwise they miss this batch by a fraction of a millisecond and
wait a whole batch for the next one, which is most of the tail under load. With nothing decoding
(an idle server) there is nothing to wait for, so it adds no latency there.
Texts are padded to the longest in their batch, never to the model's maximum.

A request whose deadline passes while queued is answered 504 at its deadline and never runs; a
request whose client disconnects is dropped the same way; both are checked once more when its
batch is taken (at the end of the batch before it, or, with `lookahead_s`, just before). In a batch
handed over early, still waiting behind the running one, such a request is answered at once all
the same; its row still runs with the others, unless no request of that batch is left, when the
inference thread skips the batch.
Each batch comes back as one result per row, in row order, and row i is delivered to item i.

The health monitor (app.health) hears whether each batch answered anything (`on_batch`), and when
a forward pass hangs it fails the running batch and everything queued behind it (`abandon`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from enum import IntEnum
from functools import partial
from typing import Final

from app.errors import ClientGone, DeadlineExceeded, ModelFailure, NotReady, Overloaded, ServiceError
from app.items import ByteArray, Kind, Row, RowResult, TokenArray
from app.lateness_limit import DeadlineClasses, gauge_label
from app.metrics import Metrics
from app.request_timeout import expired_before_queue

log = logging.getLogger(__name__)

BatchRunner = Callable[[Kind, ByteArray | None, TokenArray | None], list[RowResult]]
StageBuffers = tuple[ByteArray | None, TokenArray | None]  # images [N,3,H,W], tokens [N,L_max]

_EWMA: Final = 0.2  # weight of the newest batch in the running estimate of batch time
_DISPATCHER_STOPPED: Final = "the batcher has stopped taking batches"


class _State(IntEnum):
    QUEUED = 0
    RUNNING = 1
    DONE = 2
    DROPPED = 3


class Ticket:
    """One admitted request's place in the bounded queue, held until it runs or fails."""

    __slots__ = ("_batcher", "_stage", "admitted_at", "allowance_s")

    def __init__(self, batcher: MicroBatcher, allowance_s: float) -> None:
        self._batcher = batcher
        self._stage: str | None = "decode"
        self.admitted_at = time.perf_counter()
        self.allowance_s = allowance_s  # all the time the request allowed, from its first byte

    def _move(self, stage: str | None) -> None:
        if self._stage is None:
            return
        gauge = self._batcher.metrics.queue_depth
        gauge.labels(self._stage).dec()
        if stage is None:
            self._batcher.admitted -= 1
            self._batcher._wakeup.set()  # one fewer request decoding: a gathering dispatcher re-checks
        else:
            gauge.labels(stage).inc()
        self._stage = stage

    def release(self) -> None:
        self._move(None)


@dataclass(eq=False, slots=True)
class _Item:
    kind: Kind
    image: ByteArray | None  # [3, H, W] until staged
    tokens: TokenArray | None  # [L] until staged
    length: int
    deadline: float  # loop.time()
    enqueued: float  # loop.time(), for scheduling
    queued_at: float  # time.perf_counter(), for the queue-wait histogram (uvloop's clock ticks in ms)
    future: asyncio.Future[Row]
    ticket: Ticket
    state: _State = _State.QUEUED
    timer: asyncio.TimerHandle | None = None
    batch: _Batch | None = None  # once handed to the inference thread


class _Stage:
    """One batch buffer: rows are written as items arrive, so a batch is ready the moment it is taken."""

    def __init__(self, images: ByteArray | None, tokens: TokenArray | None) -> None:
        self.images = images  # [N, 3, H, W] uint8
        self.tokens = tokens  # [N, L_max] int64, 0 = padding
        self.items: list[_Item] = []

    @property
    def longest(self) -> int:
        return max((item.length for item in self.items), default=1)

    def add(self, item: _Item) -> None:
        row = len(self.items)
        if self.images is not None:
            assert item.image is not None
            self.images[row] = item.image
        if self.tokens is not None:
            assert item.tokens is not None
            self.tokens[row, : item.length] = item.tokens
            self.tokens[row, item.length :] = 0  # the buffer is reused: clear an earlier, longer text
        item.image = item.tokens = None  # staged: the request's own copy can go
        self.items.append(item)

    def keep(self, rows: Sequence[int]) -> None:
        """Compact to the given rows (ascending), after some items left before running."""
        for new, old in enumerate(rows):
            if new != old:
                if self.images is not None:
                    self.images[new] = self.images[old]
                if self.tokens is not None:
                    self.tokens[new] = self.tokens[old]
        self.items = [self.items[row] for row in rows]

    def views(self) -> StageBuffers:
        count = len(self.items)
        images = self.images[:count] if self.images is not None else None
        tokens = self.tokens[:count, : self.longest] if self.tokens is not None else None
        return images, tokens


@dataclass(eq=False)
class _Lane:
    """The queue of one Kind: the filling buffer, the free ones, and what did not fit yet."""

    kind: Kind
    filling: _Stage
    free: list[_Stage]  # neither filling nor on the device: the running batch's and the next one's are out
    overflow: deque[_Item] = field(default_factory=deque)
    live: int = 0  # QUEUED items in filling + overflow

    def items(self) -> list[_Item]:
        """Every item in the filling buffer and the overflow, queued or left (a copy: dropping one
        while going through it changes nothing)."""
        return [*self.filling.items, *self.overflow]

    def oldest(self) -> float:
        for item in self.filling.items:
            if item.state is _State.QUEUED:
                return item.enqueued
        for item in self.overflow:
            if item.state is _State.QUEUED:
                return item.enqueued
        return math.inf


@dataclass(eq=False, slots=True)
class _Stamps:
    """When a batch really ran, written by the inference thread (time.perf_counter())."""

    started: float | None = None
    ended: float | None = None
    # Set by the event loop when every request of a batch that has not started was answered (their
    # deadlines, their clients gone, a hung pass ahead, shutdown): the inference thread skips it.
    unwanted: bool = False


@dataclass(eq=False, slots=True)
class _Batch:
    """A batch handed to the inference thread."""

    lane: _Lane
    stage: _Stage
    future: Future[list[RowResult]]  # the inference thread's: done once the pass returned
    stamps: _Stamps
    submitted: float  # time.perf_counter()
    shape: tuple[Kind, int, int]  # what its duration is estimated by (`_shape_of`)
    abandoned: bool = False  # failed by `abandon`: its duration says nothing of the next batch's


def _could_make(item: _Item, now: float, needed_s: float) -> bool:
    """Still queued (not a request that has left), and due at least `needed_s` from now."""
    return item.state is _State.QUEUED and item.deadline - now >= needed_s


def _shape_of(kind: Kind, stage: _Stage) -> tuple[Kind, int, int]:
    """Kind, batch size, and the padded text length rounded up to a power of two: a batch of long
    texts runs several times longer than one of short texts of the same size."""
    return kind, len(stage.items), _length_bucket(stage.longest if kind.needs_text else 0)


def _length_bucket(longest: int) -> int:
    return 1 << (longest - 1).bit_length() if longest else 0


def stages_per_kind(lookahead_s: float) -> int:
    """Batch buffers each kind needs: one filling and one running, and the next batch's when it
    is handed over early."""
    return 3 if lookahead_s > 0 else 2


def _lane(kind: Kind, buffers: Sequence[StageBuffers], needed: int) -> _Lane:
    if len(buffers) < needed:
        raise ValueError(f"{kind.value} has {len(buffers)} batch buffers, {needed} are needed")
    first, *rest = (_Stage(*pair) for pair in buffers)
    return _Lane(kind, first, rest)


class MicroBatcher:
    def __init__(
        self,
        *,
        run: BatchRunner,
        executor: Executor,
        buffers: Mapping[Kind, Sequence[StageBuffers]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        gather_s: float = 0.0,
        lookahead_s: float = 0.0,
        metrics: Metrics,
        on_batch: Callable[[bool], None] | None = None,
    ) -> None:
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.gather_s = gather_s
        self._lookahead_s = lookahead_s  # read-only: the buffer count depends on it
        self.max_queue = max_queue
        self.metrics = metrics
        self.on_batch = on_batch  # called after each batch: did any item get an answer?
        self.admitted = 0  # tickets held: decoding + queued
        needed = stages_per_kind(lookahead_s)
        self._lanes = {kind: _lane(kind, stages, needed) for kind, stages in buffers.items()}
        self._wakeup = asyncio.Event()
        self._device_free = asyncio.Event()  # set when the last batch on the device is delivered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_device: list[_Batch] = []  # the running batch, and the next one when handed over early
        self._durations: dict[tuple[Kind, int, int], float] = {}  # running estimate per `_shape_of`
        self._window: _Batch | None = None  # the running batch, while the next may be handed over early
        self._window_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._halted = False  # stop() is past its grace period: no batch is taken from then on
        self._stalled: ServiceError | None = None  # set while a hung pass holds the device (abandon)
        self._batch_seconds = 0.0  # running estimate, for Retry-After
        self._item_seconds = 0.0  # running estimate of batch time per item, for admission by deadline
        self._fastest: dict[Kind, float] = {}  # the shortest batch of each kind that ran, for the lateness limit
        # From the floor (a quarter batch: with fewer requests in the server, a late answer is not
        # the load's doing) to what the other bounds allow: a full queue and two batches on the
        # device (the running one and the one handed over early).
        floor = max(1, max_batch_size // 4)
        self.lateness = DeadlineClasses(floor=floor, ceiling=max_queue + 2 * max_batch_size, on_new=self._gauge)

    @staticmethod
    def buffer_shapes(
        max_batch_size: int, image_size: tuple[int, int], max_length: int
    ) -> dict[Kind, tuple[tuple[int, ...] | None, tuple[int, ...] | None]]:
        images = (max_batch_size, 3, *image_size)
        tokens = (max_batch_size, max_length)
        return {kind: (images if kind.needs_image else None, tokens if kind.needs_text else None) for kind in Kind}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._dispatch_forever(), name="batcher")
        self._task.add_done_callback(self._dispatcher_ended)

    def _dispatcher_ended(self, task: asyncio.Task[None]) -> None:
        """Cancelled by stop(); anything else is a bug. Nothing takes batches from then on, so the
        queued requests get 503 now rather than 504 at their deadlines, new ones are refused, and
        liveness says so (`broken`): the orchestrator restarts the replica."""
        if task.cancelled() or (error := task.exception()) is None:
            return
        log.critical("the batcher's dispatcher stopped", exc_info=error)
        self._drop_queued(lambda: NotReady(_DISPATCHER_STOPPED, retry_after_s=1))

    @property
    def broken(self) -> str | None:
        """Why this batcher can run no request (its dispatcher stopped on an error), or None."""
        task = self._task
        if task is None or not task.done() or task.cancelled() or task.exception() is None:
            return None
        return _DISPATCHER_STOPPED

    @property
    def queued(self) -> int:
        return sum(lane.live for lane in self._lanes.values())

    @property
    def decoding(self) -> int:
        """Admitted requests still being read, parsed or decoded (not queued yet)."""
        return self.admitted - self.queued

    @property
    def running(self) -> int:
        """Items on the device now, or handed to it to run next."""
        return sum(len(batch.stage.items) for batch in self._on_device)

    @property
    def in_server(self) -> int:
        """Requests admitted (decoding or queued) or on the device."""
        return self.admitted + self.running

    @property
    def lookahead_s(self) -> float:
        return self._lookahead_s

    def expected_seconds(self, kind: Kind, size: int, longest_text: int = 0) -> float | None:
        """How long a batch of `size` items of `kind`, texts padded to `longest_text` tokens, is
        expected to run (None: no such batch has run yet)."""
        return self._durations.get((kind, size, _length_bucket(longest_text)))

    @property
    def idle(self) -> bool:
        """Nothing queued, and nothing on the device but batches abandoned to a hung pass (answered
        already: a drain need not wait for them)."""
        return self.queued == 0 and all(batch.abandoned for batch in self._on_device)

    async def stop(self, timeout_s: float) -> None:
        """Let queued and running work finish (up to timeout_s), then stop; leftovers get 503."""
        self._closed = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while not self.idle and loop.time() < end:
            await asyncio.sleep(0.005)
        # Before the dispatcher's cancellation lands, a batch delivered meanwhile (_batch_done) would
        # take the next one: a pass nobody waits for, run after the grace period.
        self._halted = True
        self._close_window()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._drop_queued(lambda: NotReady("the server is shutting down"))
        for batch in list(self._on_device):
            if batch.future.done():  # it ended just as the grace period did: its answers stand
                self._complete(batch)
                continue
            batch.stamps.unwanted = True  # still running, or queued behind a pass that never returned
            for item in batch.stage.items:
                if not item.future.done():
                    item.future.set_exception(NotReady("the server is shutting down"))

    def abandon(self, running: ServiceError, queued: ServiceError) -> None:
        """Fail the batch on the device and everything queued, at once: the inference thread is stuck.

        The running batch's requests are answered now; should the pass ever return, its results
        find their requests already answered and are dropped. A batch handed over early, behind
        it, never ran: its requests get `queued`, and the batch is skipped. Queued requests would otherwise wait
        behind it until their deadlines, and so would requests still decoding now: until `resume`,
        they get `queued` the moment they would be queued, and new requests are refused with it
        before their bodies are read.

        Each request gets its own copy of the error: an exception object raised again keeps every
        earlier raise's frames in its traceback, and with them those requests' bodies, for as long
        as the stall lasts."""
        self._stalled = queued
        for batch in self._on_device:
            batch.abandoned = True
            # A batch handed over early waits behind the hung one: it never ran, so it is queued
            # work, and should the pass return, it is skipped. `started` is read once: the pass
            # may return between two reads.
            never_ran = batch.stamps.started is None
            batch.stamps.unwanted = never_ran
            error = queued if never_ran else running
            for item in batch.stage.items:
                if not item.future.done():
                    item.future.set_exception(copy.copy(error))
        self._drop_queued(lambda: copy.copy(queued))

    def resume(self) -> None:
        """The hung pass has ended: queue requests again."""
        self._stalled = None

    def _drop_queued(self, error: Callable[[], ServiceError]) -> None:
        """Answer every queued request, each with an error of its own (see `abandon`)."""
        for lane in self._lanes.values():
            for item in lane.items():
                self._drop(item, error())

    def _unavailable(self) -> ServiceError | None:
        """503 while shutting down, while a forward pass hangs (a copy of the watchdog's error for
        each request), or once the dispatcher has stopped; None when requests may be queued."""
        if self._closed:
            return NotReady("the server is shutting down", retry_after_s=1)
        if self._stalled is not None:
            return copy.copy(self._stalled)
        if (reason := self.broken) is not None:
            return NotReady(reason, retry_after_s=1)
        return None

    # -- admission and requests ------------------------------------------------------------------

    def _gauge(self, key: int) -> None:
        """A deadline class's limit, read at each scrape (where it may be back at its ceiling)."""
        gauge = self.metrics.admission_limit.labels(gauge_label(key))
        gauge.set_function(lambda: self.lateness.limit_of(key, time.perf_counter()))

    def refusal(self, left_s: float, allowance_s: float) -> ServiceError | None:
        """Why a request would be refused admission now (counted, as shed or expired), or None.
        `left_s`: the time its deadline leaves it now, 504 when none is left. `allowance_s`: all
        the time the request allowed (X-Request-Timeout-Ms, or the default), whose deadline class's
        lateness limit may refuse it. Under load (a full batch or more admitted ahead of it), a
        request that the work ahead would keep longer than `left_s` is refused now, before its body
        is read, rather than answered 504 once it has been. With less ahead, it would join the next
        batch: the estimate per item, taken from small batches, would overstate its wait, and a
        request admitted to an idle device is also what brings a stale estimate back down."""
        if left_s <= 0:  # spent before the server read it: no place in the queue
            return expired_before_queue(self.metrics)
        if (error := self._unavailable()) is not None:
            return error
        if self.admitted >= self.max_queue:
            self.metrics.shed.labels("queue_full").inc()
            return Overloaded(
                f"the server is at its limit of {self.max_queue} queued requests", retry_after_s=self.retry_after_s()
            )
        if (binding := self.lateness.refusing(self.in_server, time.perf_counter(), allowance_s)) is not None:
            self.metrics.shed.labels("late").inc()
            return binding.error(self.retry_after_s())
        under_load = self.admitted >= self.max_batch_size
        if under_load and (wait := self.expected_wait_s()) > left_s:
            self.metrics.shed.labels("deadline").inc()
            return Overloaded(
                f"the server cannot answer within the request's deadline: about {wait * 1000:.0f} ms of work is"
                " queued ahead of it",
                retry_after_s=self.retry_after_s(),
            )
        return None

    def expected_wait_s(self) -> float:
        """How long a request admitted now waits for its answer: the items on the device, those
        admitted ahead of it and its own, at the running estimate of batch time per item. Per item,
        not per batch: when a burst begins, the batches just run were small, and so many as fit
        would be admitted before the estimate caught up, to wait past their deadlines. Small
        batches cost more per item, so the estimate errs on the side of refusing then."""
        return (self.running + self.admitted + 1) * self._item_seconds

    def admit(self, left_s: float, allowance_s: float) -> Ticket:
        """A place for a request whose deadline leaves it `left_s` from now, of `allowance_s` in all
        (its X-Request-Timeout-Ms); 429, 503 or 504 instead, as `refusal` says."""
        if (error := self.refusal(left_s, allowance_s)) is not None:
            raise error
        self.admitted += 1
        self.metrics.queue_depth.labels("decode").inc()
        return Ticket(self, allowance_s)

    def retry_after_s(self) -> int:
        """Whole seconds until the queue ahead has likely drained (at least 1)."""
        batches = math.ceil(self.admitted / self.max_batch_size) + 1
        return max(1, math.ceil(batches * self._batch_seconds))

    async def run(
        self,
        ticket: Ticket,
        kind: Kind,
        image: ByteArray | None,
        tokens: TokenArray | None,
        deadline: float,
        gone: asyncio.Future[None] | None = None,
    ) -> Row:
        """Queue one decoded request and wait for its row; raises 504/499/500/503 domain errors."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= deadline:  # while it decoded
            raise expired_before_queue(self.metrics)
        if gone is not None and gone.done():
            self.metrics.cancelled.labels("client_disconnected").inc()
            raise ClientGone("the client disconnected")
        if (error := self._unavailable()) is not None:  # since it was admitted
            raise error
        length = len(tokens) if tokens is not None else 0
        item = _Item(kind, image, tokens, length, deadline, now, time.perf_counter(), loop.create_future(), ticket)
        item.timer = loop.call_at(deadline, self._on_deadline, item)  # before: enqueueing may hand it over
        try:
            self._enqueue(item)
        except BaseException:
            lane = self._lanes[kind]
            if item.state is _State.QUEUED and item not in lane.filling.items and item not in lane.overflow:
                item.timer.cancel()  # never queued: its deadline must not drop what was never counted
                item.state = _State.DROPPED
            raise
        if gone is not None:
            gone.add_done_callback(partial(self._on_gone, item))
        try:
            row = await item.future
        except asyncio.CancelledError:
            self._drop(item, None)  # the request itself was cancelled: never run it
            if self._waiting_to_start(item, answered=True):
                self._skip_if_nobody_left(item)
            raise
        except DeadlineExceeded:
            self._answered(ticket, kind, late=True)
            raise
        self._answered(ticket, kind, late=loop.time() > deadline)
        return row

    def _answered(self, ticket: Ticket, kind: Kind, *, late: bool) -> None:
        """An answer (late: past its deadline, or 504) for the limit to learn from; not one to a
        request that allowed less than the fastest batch of its kind took, which an idle server
        misses too. All it allowed, not what was left of it when it was let in: a request that
        waited for the event loop before it was read is what the limit is for."""
        if ticket.allowance_s < self._fastest.get(kind, 0.0):
            return
        now = time.perf_counter()
        self.lateness.answered(
            late=late, in_server=self.in_server, admitted_at=ticket.admitted_at, now=now, allowance_s=ticket.allowance_s
        )

    def _enqueue(self, item: _Item) -> None:
        lane = self._lanes[item.kind]
        if not lane.overflow and len(lane.filling.items) < self.max_batch_size:
            lane.filling.add(item)
        else:
            lane.overflow.append(item)
        lane.live += 1
        item.ticket._move("queue")
        self._wakeup.set()
        if self._window is not None:
            self._hand_over_early()

    def _on_deadline(self, item: _Item) -> None:
        error = DeadlineExceeded("the request's deadline passed while it waited for the model")
        if item.state is _State.QUEUED:
            self.metrics.expired.labels("queue").inc()
            self._drop(item, error)
        elif self._waiting_to_start(item, answered=False):
            self.metrics.expired.labels("handed_over").inc()
            self._answer_before_start(item, error)

    def _on_gone(self, item: _Item, gone: asyncio.Future[None]) -> None:
        if gone.cancelled():
            return
        if item.state is _State.QUEUED:
            self.metrics.cancelled.labels("client_disconnected").inc()
            self._drop(item, ClientGone("the client disconnected"))
        elif self._waiting_to_start(item, answered=False):
            self.metrics.cancelled.labels("client_disconnected").inc()
            self._answer_before_start(item, ClientGone("the client disconnected"))

    @staticmethod
    def _waiting_to_start(item: _Item, *, answered: bool) -> bool:
        """In a batch handed over early that has not started yet; answered already, or not."""
        return (
            item.state is _State.RUNNING
            and item.batch is not None
            and item.batch.stamps.started is None
            and item.future.done() is answered
        )

    @classmethod
    def _answer_before_start(cls, item: _Item, error: ServiceError) -> None:
        """Answer a request whose batch waits behind the running one; its row is already staged, so
        it runs with the batch unless nobody in the batch is left, when the batch is skipped."""
        item.future.set_exception(error)
        cls._skip_if_nobody_left(item)

    @staticmethod
    def _skip_if_nobody_left(item: _Item) -> None:
        assert item.batch is not None
        if all(other.future.done() for other in item.batch.stage.items):
            item.batch.stamps.unwanted = True

    def _drop(self, item: _Item, error: ServiceError | None) -> None:
        """Take a queued item out for good; its row is compacted away at the next dispatch."""
        if item.state is not _State.QUEUED:
            return
        item.state = _State.DROPPED
        self._lanes[item.kind].live -= 1
        self._settle(item)
        if error is not None and not item.future.done():
            item.future.set_exception(error)

    @staticmethod
    def _settle(item: _Item) -> None:
        if item.timer is not None:
            item.timer.cancel()
        item.ticket.release()

    # -- dispatch --------------------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            if self._on_device:  # delivered by _batch_done, straight from the inference thread
                self._device_free.clear()
                await self._device_free.wait()
                continue
            lane = self._oldest_lane()
            if lane is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_wait_s > 0:
                await self._linger(lane)
            if self.gather_s > 0:
                await self._gather(lane)
            if not self._dispatch(lane) and lane.live > 0:
                # Items counted as queued, none to run: a bug. Recount, rather than loop here without
                # ever yielding, which would freeze the event loop and every request with it.
                log.error("the %s lane counted %d queued items and had none to run", lane.kind.value, lane.live)
                lane.live = sum(item.state is _State.QUEUED for item in lane.items())
                await asyncio.sleep(0)

    def _oldest_lane(self) -> _Lane | None:
        live = [lane for lane in self._lanes.values() if lane.live > 0]
        return min(live, key=_Lane.oldest) if live else None

    async def _linger(self, lane: _Lane) -> None:
        """Hold an idle device up to max_wait_s past the oldest item's arrival, for a fuller batch."""
        await self._wait_while(lambda: lane.live < self.max_batch_size, lane.oldest() + self.max_wait_s)

    async def _gather(self, lane: _Lane) -> None:
        """Wait up to gather_s while requests are still decoding, so that they join this batch."""
        until = asyncio.get_running_loop().time() + self.gather_s
        await self._wait_while(lambda: self.decoding > 0 and lane.live < self.max_batch_size, until)

    async def _wait_while(self, condition: Callable[[], bool], until: float) -> None:
        """Re-check `condition` at every wakeup (a request queued, or one leaving decoding) until `until`."""
        loop = asyncio.get_running_loop()
        while condition() and (remaining := until - loop.time()) > 0:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _arm(self, batch: _Batch) -> None:
        """Open the early hand-over window lookahead_s before `batch`, now running, is expected to end.

        Otherwise the device waits, between two batches, for the event loop to hear that one ended,
        take the next and wake the inference thread; and a loop busy decoding a run of requests
        hears it late. Handed over early, the next batch is already in the inference thread's queue
        when this one returns. It takes what is queued when the window opens, or the first request
        queued after, as it would at the end: an item queued later waits for the batch after, so
        the window is kept short. A batch shape not run yet has no estimate: no window."""
        estimate = self._durations.get(batch.shape)
        if estimate is None or self._closing_down():  # stop() may deliver a batch after the dispatcher
            return
        started = batch.stamps.started if batch.stamps.started is not None else time.perf_counter()
        # Never before half the batch: a wide window on a short batch would hand over each request
        # as it arrives, one at a time.
        opens = started + max(estimate / 2, estimate - self.lookahead_s)
        delay = max(0.0, opens - time.perf_counter())
        self._window_timer = asyncio.get_running_loop().call_later(delay, self._open_window, batch)

    def _open_window(self, batch: _Batch) -> None:
        self._window_timer = None
        if self._on_device == [batch]:  # also when its pass has just returned: the device is free for it
            self._window = batch
            self._hand_over_early()

    def _hand_over_early(self) -> None:
        """The next batch to the inference thread, behind the running one (window open, work queued).
        With gather_s, not while requests are still decoding (unless the batch is full): at the end
        of the running batch the dispatcher gathers them as it would without the window."""
        ahead = self._window
        if ahead is None or self._on_device != [ahead] or self._closing_down():
            return
        lane = self._oldest_lane()
        if lane is None:
            return
        if self.gather_s > 0 and self.decoding > 0 and lane.live < self.max_batch_size:
            return
        if self._dispatch(lane):
            self._window = None

    def _close_window(self) -> None:
        self._window = None
        if self._window_timer is not None:
            self._window_timer.cancel()
            self._window_timer = None

    def _closing_down(self) -> bool:
        return self._halted or self._task is None or self._task.done()

    def _dispatch(self, lane: _Lane) -> bool:
        """Hand the lane's next batch to the inference thread; False when none of it was left to run."""
        stage = self._take(lane)
        if stage is None:
            return False
        self._submit(lane, stage)
        return True

    def _take(self, lane: _Lane) -> _Stage | None:
        """The lane's next batch: live items only, topped up from the overflow; a free buffer fills next.

        An item whose deadline would pass before this batch ends (by the running estimate for its
        shape, from when the device frees) is answered 504 now rather than run: its answer would
        come too late to be of use, and its place goes to an item that can still make it."""
        now = asyncio.get_running_loop().time()
        stage = lane.filling
        self._keep_wanted(lane, stage, now, 0.0)
        if not stage.items:
            return None
        estimate = self._durations.get(_shape_of(lane.kind, stage))
        if estimate is not None:
            needed = self._device_frees_in() + estimate
            # When no queued item could make it by the estimate, the estimate may be what is wrong
            # (one slow run of this shape): the batch runs as it is, and its time corrects it.
            # Items topped up from the overflow are not checked again against their own shape.
            if any(_could_make(item, now, needed) for item in lane.items()):  # the stage is the filling one
                self._keep_wanted(lane, stage, now, needed)
                if not stage.items:
                    return None
        lane.filling = lane.free.pop()
        for item in stage.items:
            item.state = _State.RUNNING
            lane.live -= 1
            item.ticket.release()  # its deadline timer stays while its batch may wait behind another (_submit)
        return stage

    def _keep_wanted(self, lane: _Lane, stage: _Stage, now: float, needed_s: float) -> None:
        rows = [row for row, item in enumerate(stage.items) if self._still_wanted(item, now, needed_s)]
        if len(rows) != len(stage.items):
            stage.keep(rows)
        self._refill(lane, stage, now, needed_s)

    def _still_wanted(self, item: _Item, now: float, needed_s: float = 0.0) -> bool:
        """Queued, and at least `needed_s` from its deadline (else answered 504 now)."""
        if item.state is not _State.QUEUED:
            return False
        if item.deadline <= now:  # its timer has not fired yet: the deadline still wins
            self.metrics.expired.labels("dispatch").inc()
            self._drop(item, DeadlineExceeded("the request's deadline passed while it waited for the model"))
            return False
        if item.deadline - now < needed_s:
            self.metrics.expired.labels("cannot_finish").inc()
            self._drop(item, DeadlineExceeded("the request's deadline would pass before the model could answer it"))
            return False
        return True

    def _refill(self, lane: _Lane, stage: _Stage, now: float, needed_s: float = 0.0) -> None:
        while lane.overflow and len(stage.items) < self.max_batch_size:
            item = lane.overflow.popleft()
            if not self._still_wanted(item, now, needed_s):
                continue
            try:
                stage.add(item)
            except Exception:  # a bug: out of every buffer, the item must not stay counted as queued
                log.exception("a queued %s item could not be staged", lane.kind.value)
                self._drop(item, ModelFailure("the request could not be queued for the model"))

    def _device_frees_in(self) -> float:
        """Seconds until the batch on the device is expected to end (0: none, or no estimate)."""
        if not self._on_device:
            return 0.0
        running = self._on_device[-1]
        estimate = self._durations.get(running.shape)
        if estimate is None or running.future.done():  # returned: only its delivery is still to come
            return 0.0
        began = running.stamps.started if running.stamps.started is not None else time.perf_counter()
        return max(0.0, began + estimate - time.perf_counter())

    def _submit(self, lane: _Lane, stage: _Stage) -> None:
        loop = asyncio.get_running_loop()
        images, tokens = stage.views()
        stamps = _Stamps()
        submitted = time.perf_counter()
        future = self._executor.submit(self._run_batch, stamps, lane.kind, images, tokens)
        batch = _Batch(lane, stage, future, stamps, submitted, _shape_of(lane.kind, stage))
        future.add_done_callback(partial(self._from_inference_thread, batch))
        early = bool(self._on_device)  # behind the running batch: its requests can still expire or leave
        for item in stage.items:
            item.batch = batch
            if not early and item.timer is not None:
                item.timer.cancel()
        self._on_device.append(batch)
        self._refill(lane, lane.filling, loop.time())  # collate the next batch while this one runs
        if self.lookahead_s > 0 and len(self._on_device) == 1:
            self._arm(batch)

    def _run_batch(
        self, stamps: _Stamps, kind: Kind, images: ByteArray | None, tokens: TokenArray | None
    ) -> list[RowResult]:
        """On the inference thread: the batch, stamped with when it really ran (it may have waited
        there behind the one before it)."""
        if stamps.unwanted:  # every request in it was answered while it waited
            return []
        stamps.started = time.perf_counter()
        try:
            return self._run(kind, images, tokens)
        finally:
            stamps.ended = time.perf_counter()

    def _from_inference_thread(self, batch: _Batch, _: Future[list[RowResult]]) -> None:
        """On the inference thread, as the pass returns: deliver the batch at the event loop's next
        turn. Awaited as `run_in_executor`'s future, shielded, the batch reached the dispatcher three
        turns of the loop later (the future's result, the shield's, the dispatcher's wake-up), and
        under load each turn is a burst of other requests' work: 27-39 ms from a pass's end to its
        delivery (answers that came late at 1.5 times the capacity, medians), against 9-16 ms now."""
        assert self._loop is not None  # set by start(), before any batch is submitted
        with contextlib.suppress(RuntimeError):  # the loop has closed: the process is stopping
            self._loop.call_soon_threadsafe(self._batch_done, batch)

    def _batch_done(self, batch: _Batch) -> None:
        if batch not in self._on_device:  # stop() delivered it already, as its grace period ended
            return
        try:
            self._complete(batch)
        except BaseException:  # a bug: the dispatcher must not wait for a device that is empty
            if not self._on_device:
                self._device_free.set()
            raise
        if self._on_device:  # the batch handed over early runs now
            return
        if self.max_wait_s == 0 and self.gather_s == 0 and not self._closing_down():
            # The next batch at once, here, rather than at the dispatcher's wake-up a turn later.
            lane = self._oldest_lane()
            if lane is not None and self._dispatch(lane):
                return
        self._device_free.set()

    def _complete(self, batch: _Batch) -> None:
        """Deliver a batch whose future is done, and free its buffer."""
        lane, stage = batch.lane, batch.stage
        count = len(stage.items)
        failed = False
        if (error := batch.future.exception()) is not None:  # the engine isolates model errors: the worker failed
            log.error("a %s batch of %d could not run", lane.kind.value, count, exc_info=error)
            results: Sequence[RowResult] = [ModelFailure("the model could not run") for _ in range(count)]
            failed = True
        else:
            results = batch.future.result()
        self._on_device.remove(batch)
        self._close_window()
        if self._on_device and self.lookahead_s > 0:  # the batch handed over early runs now
            self._arm(self._on_device[0])
        for item in stage.items:
            if item.timer is not None:
                item.timer.cancel()
        if batch.stamps.started is None and batch.stamps.unwanted:  # skipped: nobody was left to answer
            stage.items = []
            lane.free.append(stage)
            return
        started = batch.stamps.started if batch.stamps.started is not None else batch.submitted
        elapsed = (batch.stamps.ended if batch.stamps.ended is not None else time.perf_counter()) - started
        if not (failed or batch.abandoned):  # a hung pass's time would hold the next windows shut, and Retry-After up
            self._batch_seconds += _EWMA * (elapsed - self._batch_seconds)
            per_item = elapsed / count
            self._item_seconds += (_EWMA if self._item_seconds else 1.0) * (per_item - self._item_seconds)
            previous = self._durations.get(batch.shape, elapsed)
            self._durations[batch.shape] = previous + _EWMA * (elapsed - previous)
            self._fastest[lane.kind] = min(self._fastest.get(lane.kind, math.inf), elapsed)
        self.metrics.batch_size.labels(lane.kind.value).observe(count)
        self.metrics.batch_duration.labels(lane.kind.value).observe(elapsed)
        for item in stage.items:  # until the batch began on the device, behind any batch ahead of it
            if not item.future.done():  # not answered while it waited (a deadline, a client gone)
                self.metrics.queue_wait.labels(lane.kind.value).observe(started - item.queued_at)
        if len(results) != count:  # never guess which row belongs to whom
            log.error("a %s batch of %d returned %d results", lane.kind.value, count, len(results))
            results = [ModelFailure("the model returned the wrong number of results") for _ in range(count)]
        for item, result in zip(stage.items, results, strict=True):
            self._deliver(item, result)
        stage.items = []
        lane.free.append(stage)
        if self.on_batch is not None:
            self.on_batch(any(isinstance(result, Row) for result in results))

    def _deliver(self, item: _Item, result: RowResult) -> None:
        item.state = _State.DONE
        if item.future.done():  # the request was cancelled while it ran
            return
        if isinstance(result, ModelFailure):
            self.metrics.model_failures.labels(item.kind.value).inc()
            item.future.set_exception(result)
        else:
            item.future.set_result(result)
