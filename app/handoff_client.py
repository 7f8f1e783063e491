"""In a front-end process: the link to the device process, and the batcher that forwards over it.

RemoteBatcher has the MicroBatcher's face towards the routes (admit, run, refusal, idle), so a
front-end runs the very same routes, parsing and decoding as the device process. Its own bound
(`max_queue` requests decoding or waiting here) keeps one front-end's memory in check; the
replica's queue bound is the device's, which answers 429 for an item over it.

When the device process goes away, every waiting request gets 503 at once, /healthz turns 503,
and the front-end exits (it has nothing to serve with). When it stops answering (no state for
SILENCE_S, though it sends one every HEARTBEAT_S), /healthz turns 503 so that the orchestrator
restarts the replica; and a request it has not answered by its deadline plus the forward
watchdog's limit (by then the device would have answered 504 or 500 itself) gets 503.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from app import handoff
from app.errors import ClientGone, NotReady, Overloaded, ServiceError
from app.handoff import SILENCE_S, DeviceState, Message, ProtocolError, settle
from app.items import ByteArray, Kind, Row, TokenArray
from app.lateness_limit import deadline_class
from app.metrics import Metrics
from app.request_timeout import expired_before_queue

log = logging.getLogger(__name__)

DEVICE_GONE: Final = "the device process has gone"
CONNECT_POLL_S: Final = 0.05
# The device process answers a METRICS request after pulling the other front-ends' snapshots (at
# most 1 s: app.handoff_server.PULL_TIMEOUT_S) and merging them; well past that, it is not answering.
METRICS_TIMEOUT_S: Final = 5.0


class DeviceLink:
    def __init__(
        self, path: Path, own_metrics: Callable[[], bytes], retry_after_s: int, answer_margin_s: float
    ) -> None:
        self._path = path
        self._own_metrics = own_metrics
        self._retry_after_s = retry_after_s
        self._answer_margin_s = answer_margin_s  # past an item's deadline: the device is not answering
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Row]] = {}
        self._metrics: dict[int, asyncio.Future[bytes]] = {}
        self.device = DeviceState(liveness=None, readiness="connecting to the device process", info=b"")
        self.state_changed = asyncio.Event()
        self.lost = False
        self.on_lost: Callable[[], None] | None = None
        self._heard = time.monotonic()  # when the device process last sent anything
        self._closing = False

    async def connect(self, timeout_s: float) -> None:
        """Connect, retrying while the device process is still creating its socket."""
        end = time.monotonic() + timeout_s
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(str(self._path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() >= end:
                    raise
                await asyncio.sleep(CONNECT_POLL_S)
        self._task = asyncio.create_task(self._read_forever(), name="device-link")

    async def close(self, final_snapshot: bytes | None = None) -> None:
        """Leave the counters behind (SNAPSHOT 0, flushed before the close), then close the link."""
        self._closing = True  # the reader's end of the link is ours, not the device going away
        if self._writer is not None and not self._writer.is_closing():
            if final_snapshot is not None:
                self._send(handoff.encode_id(Message.SNAPSHOT, 0, final_snapshot))
            try:
                async with asyncio.timeout(1.0):
                    await self._writer.drain()
                    self._writer.close()
                    await self._writer.wait_closed()
            except (TimeoutError, ConnectionError):
                self._writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def liveness(self) -> str | None:
        if self.lost:
            return DEVICE_GONE
        silent_s = time.monotonic() - self._heard
        if self._reader is not None and silent_s > SILENCE_S:
            return f"the device process has not answered for {silent_s:.0f} s"
        return self.device.liveness

    def readiness(self) -> str | None:
        return self.liveness() or self.device.readiness

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def call(
        self,
        kind: Kind,
        image: ByteArray | None,
        tokens: TokenArray | None,
        seconds_left: float,
        allowance_s: float,
        gone: asyncio.Future[None] | None,
    ) -> Row:
        """Hand one item to the device, with the time left and all the request allowed; its row, or
        the error the device answered."""
        if self.lost:
            raise NotReady(DEVICE_GONE, retry_after_s=self._retry_after_s)
        item_id = next(self._ids)
        deadline = time.monotonic() + seconds_left
        # Encoded before anything is pending: should it raise, no entry is left behind for good.
        item = handoff.encode_item(item_id, kind, deadline, allowance_s, image, tokens)
        future: asyncio.Future[Row] = asyncio.get_running_loop().create_future()
        self._pending[item_id] = future
        self._send(item)
        if gone is not None:
            gone.add_done_callback(lambda _: self._cancel(item_id))
        try:
            async with asyncio.timeout(seconds_left + self._answer_margin_s):
                return await future
        except TimeoutError:
            self._cancel(item_id)
            raise NotReady("the device process did not answer", retry_after_s=self._retry_after_s) from None
        except asyncio.CancelledError:
            self._cancel(item_id)
            raise
        finally:
            self._pending.pop(item_id, None)

    def _cancel(self, item_id: int) -> None:
        if item_id in self._pending and not self.lost:
            self._send(handoff.encode_id(Message.CANCEL, item_id))

    async def metrics(self, timeout_s: float = METRICS_TIMEOUT_S) -> bytes:
        """The replica's merged exposition, from the device process; 503 when it does not answer
        within `timeout_s` (its loop stalled): a scrape must not hold a handler, and a drain, for good."""
        if self.lost:
            raise NotReady(DEVICE_GONE, retry_after_s=self._retry_after_s)
        request_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._metrics[request_id] = future
        self._send(handoff.encode_id(Message.METRICS, request_id))
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise NotReady("the device process did not answer", retry_after_s=self._retry_after_s) from None
        finally:
            self._metrics.pop(request_id, None)

    def announce_serving(self) -> None:
        """Tell the device process that this link serves requests: from now on it counts as a front-end."""
        self._send(handoff.encode_id(Message.SERVING, 0))

    def _send(self, buffers: list[bytes | memoryview]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.writelines(buffers)

    async def _read_forever(self) -> None:
        assert self._reader is not None
        try:
            while (got := await handoff.read_frame(self._reader)) is not None:
                self._on_frame(*got)
        except ProtocolError as exc:
            log.error("the link to the device process broke: %s", exc)
        except ConnectionError:
            pass
        self._lose()

    def _on_frame(self, kind: Message, body: memoryview) -> None:
        self._heard = time.monotonic()
        if kind is Message.ROW:
            item_id, row = handoff.decode_row(body)
            settle(self._pending.get(item_id), row)
        elif kind is Message.ERROR:
            item_id, error = handoff.decode_error(body)
            settle(self._pending.get(item_id), error)
        elif kind is Message.STATE:
            self.device = handoff.decode_state(body)
            self.state_changed.set()
        elif kind is Message.METRICS_TEXT:
            request_id, text = handoff.decode_id(body)
            settle(self._metrics.get(request_id), text)
        elif kind is Message.PULL:
            pull_id, _ = handoff.decode_id(body)
            self._send(handoff.encode_id(Message.SNAPSHOT, pull_id, self._own_metrics()))
        else:
            raise ProtocolError(f"the device sent {kind.name}")

    def _lose(self) -> None:
        if self.lost:
            return
        self.lost = True
        self.state_changed.set()
        error = NotReady(DEVICE_GONE, retry_after_s=self._retry_after_s)
        for item in self._pending.values():
            settle(item, error)
        for request in self._metrics.values():
            settle(request, error)
        if self.on_lost is not None and not self._closing:
            log.error("%s: this front-end stops", DEVICE_GONE)
            self.on_lost()


class RemoteTicket:
    """A front-end's admission slot, held while the request decodes and until its answer is back."""

    __slots__ = ("_batcher", "_stage", "allowance_s")

    def __init__(self, batcher: RemoteBatcher, allowance_s: float) -> None:
        self._batcher = batcher
        self._stage: str | None = "decode"
        self.allowance_s = allowance_s  # all the time the request allowed, from its first byte

    def sent(self) -> None:
        """Decoded and handed over: the device's queue counts it from here."""
        if self._stage == "decode":
            self._batcher.metrics.queue_depth.labels("decode").dec()
            self._stage = "device"

    def release(self) -> None:
        if self._stage is None:
            return
        self.sent()
        self._batcher.admitted -= 1
        self._stage = None


class RemoteBatcher:
    def __init__(self, link: DeviceLink, max_queue: int, max_running: int, metrics: Metrics) -> None:
        self._link = link
        self.max_queue = max_queue
        # This process counts its items until their answers are back, and cannot tell when one starts
        # running on the device, where running items no longer count against the bound. Its own
        # bound allows `max_running` more (the batches that can be on the device at once): it never
        # refuses a request the device would take. The replica's bound is the device's (`queue_full`).
        self._local_bound = max_queue + max_running
        self.metrics = metrics
        self.admitted = 0
        self._closed = False

    @property
    def idle(self) -> bool:
        """Nothing of this front-end's on the device (for decoding a lone request on the loop)."""
        return self._link.in_flight == 0

    @property
    def broken(self) -> None:
        """The device process's batcher says for itself, through its liveness (DeviceLink.liveness)."""
        return None

    def refusal(self, left_s: float, allowance_s: float) -> ServiceError | None:
        """Refused before the body is read: 504 when its deadline has passed (`left_s` <= 0); 429 at
        this process's bound, or at the replica's, which the device process reports (an item over
        it would be refused there, after its body and decode).
        A request's deadline is weighed against the queue where the queue is: in the device
        process, when the item arrives. The lateness limit of the request's deadline class, which
        the device process keeps, refuses here as well while the device says it does."""
        if left_s <= 0:
            return expired_before_queue(self.metrics)
        if self._closed or self._link.lost:
            return NotReady("the server is shutting down" if self._closed else DEVICE_GONE, retry_after_s=1)
        device = self._link.device
        if self.admitted >= self._local_bound or device.queue_full:
            self.metrics.shed.labels("queue_full").inc()
            return Overloaded(
                f"the server is at its limit of {self.max_queue} queued requests", retry_after_s=device.retry_after_s
            )
        key = deadline_class(allowance_s)
        if (binding := next((b for b in device.late if b.deadline_class == key), None)) is not None:
            self.metrics.shed.labels("late").inc()
            return binding.error(device.retry_after_s)
        return None

    def admit(self, left_s: float, allowance_s: float) -> RemoteTicket:
        if (error := self.refusal(left_s, allowance_s)) is not None:
            raise error
        self.admitted += 1
        self.metrics.queue_depth.labels("decode").inc()
        return RemoteTicket(self, allowance_s)

    async def run(
        self,
        ticket: RemoteTicket,
        kind: Kind,
        image: ByteArray | None,
        tokens: TokenArray | None,
        deadline: float,
        gone: asyncio.Future[None] | None = None,
    ) -> Row:
        seconds_left = deadline - asyncio.get_running_loop().time()
        if seconds_left <= 0:  # while it decoded
            raise expired_before_queue(self.metrics)
        if gone is not None and gone.done():
            self.metrics.cancelled.labels("client_disconnected").inc()
            raise ClientGone("the client disconnected")
        ticket.sent()
        return await self._link.call(kind, image, tokens, seconds_left, ticket.allowance_s, gone)

    async def stop(self, timeout_s: float) -> None:
        """Refuse new requests; let those handed over finish, up to timeout_s."""
        self._closed = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while self._link.in_flight and not self._link.lost and loop.time() < end:
            await asyncio.sleep(0.005)
