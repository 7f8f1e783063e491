"""In the device process: the Unix socket that front-end processes hand their decoded items to.

Each item runs through the device's own MicroBatcher exactly as a request of the device process
does: admission (429 at the replica's one queue bound), deadline (the time left when the
front-end sent it), the client's disconnect (CANCEL), one batch across every process's items.
Its row or its error goes back on the link it came from.

The device's liveness, readiness and /info are pushed to every front-end when they change, so
their /healthz and /readyz tell the truth without a round trip. /metrics from any process is the
replica's: the device pulls each front-end's own exposition and merges (app.metrics_merge).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from app import handoff
from app.batching import MicroBatcher
from app.errors import ModelFailure, ServiceError
from app.handoff import HEARTBEAT_S, DeviceState, Message, ProtocolError
from app.lateness_limit import Binding
from app.metrics_merge import merge, monotonic_part
from app.state import AppState

log = logging.getLogger(__name__)

STATE_POLL_S: Final = 0.05  # how stale a front-end's view of readiness may be
# What a front-end may leave unread before its link is dropped: minutes of state frames (each
# carries /info, about 1.2 KB, at most every 50 ms; an hour's heartbeats when nothing changes)
# from a front-end that stopped reading (a stopped process, a stuck loop), which otherwise grow
# this process, the one that holds the model, without bound. A healthy link carries far less:
# the rows of at most its admitted requests.
MAX_UNREAD_BYTES: Final = 4 << 20
PULL_TIMEOUT_S: Final = 1.0  # a front-end that does not answer a pull in time counts with its last snapshot


@dataclass(eq=False)
class _Link:
    writer: asyncio.StreamWriter
    max_unread_bytes: int
    gone: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # items not answered yet
    pulls: dict[int, asyncio.Future[str]] = field(default_factory=dict)
    snapshot: str = ""  # the front-end's own exposition, as last pulled
    serving: bool = False  # said SERVING: a front-end's link, not its check before it listens

    def send(self, buffers: list[bytes | memoryview]) -> None:
        if self.writer.is_closing():
            return
        self.writer.writelines(buffers)
        unread = self.writer.transport.get_write_buffer_size()
        if unread > self.max_unread_bytes:
            # Aborted, not closed: a close waits to flush what the front-end does not read. Its items
            # are dropped as for any link that ends; the front-end, if it wakes, finds the device gone.
            log.error("a front-end left %d bytes unread; dropping its link", unread)
            self.writer.transport.abort()


class HandoffServer:
    def __init__(
        self, state: AppState, path: Path, info: Callable[[], bytes], max_unread_bytes: int = MAX_UNREAD_BYTES
    ) -> None:
        self._state = state
        self._path = path
        self._info = info  # the /info body once the model is loaded (b"" before)
        self._max_unread_bytes = max_unread_bytes
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._watch: asyncio.Task[None] | None = None
        self._current = DeviceState(liveness=None, readiness="loading", info=b"")
        self._ids = itertools.count(1)
        self._retired = ""  # counters of front-ends that have exited

    @property
    def path(self) -> Path:
        return self._path

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self._path))
        self._watch = asyncio.create_task(self._push_state_forever(), name="handoff-state")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.writer.close()
        for task in list(self._tasks):
            task.cancel()
        watch = [self._watch] if self._watch is not None else []
        await asyncio.gather(*self._tasks, *watch, return_exceptions=True)

    # -- one front-end's link ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer, self._max_unread_bytes)
        self._links.add(link)
        link.send(handoff.encode_state(self._current))
        try:
            while (got := await handoff.read_frame(reader)) is not None:
                self._on_frame(link, *got)
        except ProtocolError as exc:
            log.error("a front-end's link broke: %s; closing it", exc)
        except ConnectionError:
            pass
        finally:
            self._links.discard(link)
            self._count_serving()
            for gone in link.gone.values():  # nobody reads the answers now: drop what has not run
                handoff.settle(gone, None)
            self._retire(link.snapshot)
            writer.close()

    def _on_frame(self, link: _Link, kind: Message, body: memoryview) -> None:
        if kind is Message.ITEM:
            item = handoff.decode_item(body)
            gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            link.gone[item.id] = gone
            self._state.metrics.handoff_items.inc()
            self._spawn(self._run(link, item, gone))
        elif kind is Message.CANCEL:
            item_id, _ = handoff.decode_id(body)
            handoff.settle(link.gone.get(item_id), None)
        elif kind is Message.METRICS:
            request_id, _ = handoff.decode_id(body)
            self._spawn(self._answer_metrics(link, request_id))
        elif kind is Message.SERVING:
            link.serving = True
            self._count_serving()
        elif kind is Message.SNAPSHOT:
            pull_id, text = handoff.decode_id(body)
            link.snapshot = text.decode()
            handoff.settle(link.pulls.pop(pull_id, None), link.snapshot)  # id 0: unasked, on its way out
        else:
            raise ProtocolError(f"a front-end sent {kind.name}")

    def _count_serving(self) -> None:
        self._state.metrics.frontends.set(sum(link.serving for link in self._links))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, link: _Link, item: handoff.Item, gone: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            serving = self._state.serving()  # 503 while loading, or dead
            # 429 at the replica's one bound, or when the work ahead would keep the item past its
            # deadline; 503 while stopping. An item already past it (on the way here, or waiting for
            # this loop) gets 504, as the front-end gives one past it before sending: not a refusal.
            ticket = serving.batcher.admit(item.deadline - time.monotonic(), item.allowance)
        except ServiceError as exc:
            link.gone.pop(item.id, None)
            link.send(handoff.encode_error(item.id, exc))
            return
        try:
            deadline = loop.time() + (item.deadline - time.monotonic())
            row = await serving.batcher.run(ticket, item.kind, item.image, item.tokens, deadline, gone)
            answer = handoff.encode_row(item.id, row)
        except ServiceError as exc:
            link.send(handoff.encode_error(item.id, exc))
        except Exception:  # never leave a front-end's request waiting (a row that does not encode): a 500, as here
            log.exception("an item from a front-end failed")
            link.send(handoff.encode_error(item.id, ModelFailure("the model could not run")))
        else:
            link.send(answer)
        finally:
            ticket.release()
            link.gone.pop(item.id, None)

    # -- state and metrics -------------------------------------------------------------------------

    def state_now(self) -> DeviceState:
        batcher = self._state.batcher
        full, retry_after_s = False, 1
        late: tuple[Binding, ...] = ()
        if isinstance(batcher, MicroBatcher):
            full = batcher.admitted >= batcher.max_queue
            late = batcher.lateness.bindings(batcher.in_server, time.perf_counter())
            if full or late:
                retry_after_s = batcher.retry_after_s()
        return DeviceState(self._state.liveness(), self._state.readiness(), self._info(), full, late, retry_after_s)

    async def _push_state_forever(self) -> None:
        """On every change, and as a heartbeat: a front-end that hears nothing takes this process for gone."""
        sent = 0.0
        while True:
            try:
                now = self.state_now()
                if now != self._current or time.monotonic() - sent >= HEARTBEAT_S:
                    self._current, sent = now, time.monotonic()
                    for link in list(self._links):
                        link.send(handoff.encode_state(now))
            except Exception:  # a bug here must not silence the heartbeat for good
                log.exception("pushing the device state failed")
            await asyncio.sleep(STATE_POLL_S)

    async def _answer_metrics(self, link: _Link, request_id: int) -> None:
        text = await self.render_metrics()
        link.send(handoff.encode_id(Message.METRICS_TEXT, request_id, text))

    async def render_metrics(self) -> bytes:
        """The replica's exposition: this process's, plus each front-end's, pulled now."""
        loop = asyncio.get_running_loop()
        pulls: list[tuple[_Link, int, asyncio.Future[str]]] = []
        for link in list(self._links):
            pull_id = next(self._ids)
            future: asyncio.Future[str] = loop.create_future()
            link.pulls[pull_id] = future
            link.send(handoff.encode_id(Message.PULL, pull_id))
            pulls.append((link, pull_id, future))
        if pulls:
            await asyncio.wait([future for _, _, future in pulls], timeout=PULL_TIMEOUT_S)
        texts = []
        for link, pull_id, future in pulls:
            link.pulls.pop(pull_id, None)
            if link in self._links:  # one that closed meanwhile is in the retired counts already
                texts.append(future.result() if future.done() else link.snapshot)
        own = self._state.metrics.render().decode()
        return merge(own, [*texts, self._retired])

    def _retire(self, snapshot: str) -> None:
        if snapshot:
            kept = merge(self._retired, [snapshot]).decode() if self._retired else snapshot
            self._retired = monotonic_part(kept)
