"""The front-end <-> device wire (app.handoff) and the replica's merged metrics (app.metrics_merge)."""

from __future__ import annotations

import asyncio
import itertools
import struct
from pathlib import Path

import numpy as np
import pytest

from app import handoff
from app.config import Settings
from app.errors import ClientGone, DeadlineExceeded, InsufficientStorage, NotReady, Overloaded, ServiceError
from app.handoff import DeviceState, Message, ProtocolError
from app.handoff_client import DeviceLink, RemoteBatcher
from app.handoff_server import HandoffServer
from app.items import Kind, Row
from app.lateness_limit import Binding
from app.metrics import Metrics
from app.metrics_merge import merge, monotonic_part
from app.state import AppState
from tests.app.conftest import form, metric, parse_metrics, picture, run, serve, settings_for, until


def _body(buffers: list[bytes | memoryview]) -> tuple[Message, memoryview]:
    """Read one frame back through a real StreamReader, as the other side does."""

    async def read() -> tuple[Message, memoryview]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(bytes(part) for part in buffers))
        reader.feed_eof()
        got = await handoff.read_frame(reader)
        assert got is not None
        assert await handoff.read_frame(reader) is None  # exactly one frame, nothing after it
        return got

    return asyncio.run(read())


def test_an_item_arrives_as_it_was_sent() -> None:
    image = np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 5, 7)
    tokens = np.array([1, 73, 256, 229, 1], dtype=np.int64)  # ids span the whole byte range + 1
    kind, body = _body(handoff.encode_item(41, Kind.FUSE, 81234.5, 0.25, image, tokens))
    assert kind is Message.ITEM
    item = handoff.decode_item(body)
    assert (item.id, item.kind, item.deadline, item.allowance) == (41, Kind.FUSE, 81234.5, 0.25)
    assert item.image is not None and item.tokens is not None
    assert item.image.shape == (3, 5, 7) and np.array_equal(item.image, image)
    assert item.tokens.dtype == np.int64 and item.tokens.tolist() == [1, 73, 256, 229, 1]


def test_an_image_view_travels_without_its_strides() -> None:
    """The decoder hands a [3,H,W] view of an [H,W,3] array: the bytes sent are the tensor's order."""
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    view = pixels.transpose(2, 0, 1)
    item = handoff.decode_item(_body(handoff.encode_item(1, Kind.IMAGE, 1.0, 10.0, view, None))[1])
    assert item.tokens is None and item.image is not None
    assert np.array_equal(item.image, view)


def test_a_text_item_carries_no_image() -> None:
    item = handoff.decode_item(_body(handoff.encode_item(7, Kind.TEXT, 0.25, 0.25, None, np.array([5, 6])))[1])
    assert (item.kind, item.image, item.tokens is not None and item.tokens.tolist()) == (Kind.TEXT, None, [5, 6])


def test_rows_keep_their_fields() -> None:
    probs = np.array([0.25, 0.75], dtype=np.float32)
    embedding = np.array([1.0, -0.5, 0.125], dtype=np.float32)
    _, body = _body(handoff.encode_row(9, Row(probs=probs, text_embedding=embedding)))
    item_id, row = handoff.decode_row(body)
    assert item_id == 9 and row.image_embedding is None
    assert row.probs is not None and row.probs.tolist() == [0.25, 0.75]
    assert row.text_embedding is not None and row.text_embedding.tolist() == [1.0, -0.5, 0.125]


def test_ids_and_lengths_outgrow_sixteen_and_thirty_two_bits() -> None:
    """A front-end numbers its items for as long as it lives (past 2^32 after about 50 days at
    1,000 a second), and a model may have more than 65,535 labels or tokens."""
    many = np.arange(70_000, dtype=np.int64) % 256 + 1
    item = handoff.decode_item(_body(handoff.encode_item(2**40, Kind.TEXT, 1.0, 1.0, None, many))[1])
    assert item.id == 2**40 and item.tokens is not None and np.array_equal(item.tokens, many)
    probs = np.full(70_000, 1 / 70_000, dtype=np.float32)
    item_id, row = handoff.decode_row(_body(handoff.encode_row(2**40 + 1, Row(probs=probs)))[1])
    assert item_id == 2**40 + 1 and row.probs is not None and np.array_equal(row.probs, probs)
    assert handoff.decode_id(_body(handoff.encode_id(Message.CANCEL, 2**40 + 2))[1]) == (2**40 + 2, b"")
    error = handoff.decode_error(_body(handoff.encode_error(2**40 + 3, Overloaded("full", retry_after_s=3)))[1])
    assert error[0] == 2**40 + 3


def test_an_item_that_does_not_encode_leaves_nothing_pending() -> None:
    """Its request gets the error, and the link counts nothing in flight for it."""
    link = DeviceLink(Path("unused.sock"), lambda: b"", retry_after_s=1, answer_margin_s=1.0)
    too_tall = np.zeros((3, 70_000, 1), dtype=np.uint8)  # the wire's 16 bits of height

    async def body() -> None:
        with pytest.raises(struct.error):
            await link.call(Kind.IMAGE, too_tall, None, 1.0, 1.0, None)
        assert link.in_flight == 0

    run(body())


def test_a_scrape_the_device_does_not_answer_gets_503_in_time() -> None:
    link = DeviceLink(Path("unused.sock"), lambda: b"", retry_after_s=2, answer_margin_s=1.0)

    async def body() -> None:
        with pytest.raises(NotReady, match="the device process did not answer") as refused:
            await link.metrics(timeout_s=0.05)
        assert refused.value.retry_after_s == 2

    run(body())


@pytest.mark.parametrize(
    ("error", "expected_type"),
    [
        (Overloaded("full", retry_after_s=3), Overloaded),
        (InsufficientStorage("out of memory even alone"), InsufficientStorage),
        (ClientGone("the client disconnected"), ClientGone),
    ],
)
def test_errors_keep_their_class_code_message_and_retry_after(
    error: ServiceError, expected_type: type[ServiceError]
) -> None:
    _, body = _body(handoff.encode_error(5, error))
    item_id, back = handoff.decode_error(body)
    assert item_id == 5 and type(back) is expected_type
    assert (back.code, back.message, back.retry_after_s) == (error.code, error.message, error.retry_after_s)


def test_state_round_trip() -> None:
    for state in (
        DeviceState(None, "warming_up", b""),
        DeviceState("hung", "hung", b'{"model":{}}'),
        DeviceState(None, None, b"{}", queue_full=True, retry_after_s=7),
        DeviceState(None, None, b"{}", late=(Binding(4, 13), Binding(7, 300), Binding(0, 1)), retry_after_s=2),
    ):
        kind, body = _body(handoff.encode_state(state))
        assert kind is Message.STATE and handoff.decode_state(body) == state
    long = DeviceState("x" * 70_000, None, b"")  # a reason past the wire's length field is cut, not fatal
    assert handoff.decode_state(_body(handoff.encode_state(long))[1]).liveness == "x" * handoff.MAX_REASON


def test_a_frame_cut_short_or_unknown_is_a_protocol_error() -> None:
    async def read(data: bytes) -> object:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await handoff.read_frame(reader)

    whole = b"".join(bytes(part) for part in handoff.encode_id(Message.CANCEL, 3))
    with pytest.raises(ProtocolError):
        asyncio.run(read(whole[:-1]))
    with pytest.raises(ProtocolError):
        asyncio.run(read(whole[:3]))
    with pytest.raises(ProtocolError):
        asyncio.run(read(b"\x05\x00\x00\x00\x63" + b"\x00" * 4))  # type 99
    with pytest.raises(ProtocolError):
        handoff.decode_item(memoryview(b"\x00" * 5))


def _exposition(requests: int, queue: int, ready: int, resident: float) -> str:
    metrics = Metrics(8)
    if requests:
        metrics.requests.labels("/predict", "200").inc(requests)
        metrics.latency.labels("/predict").observe(0.004)
    metrics.queue_depth.labels("decode").set(queue)
    metrics.ready.set(ready)
    text = metrics.render().decode()
    # The process collector reads this very process: give each exposition its own memory figure.
    return "\n".join(
        f"process_resident_memory_bytes {resident}" if line.startswith("process_resident_memory_bytes ") else line
        for line in text.splitlines()
    )


def test_merged_metrics_sum_the_processes_and_keep_the_device_state() -> None:
    device = _exposition(requests=3, queue=1, ready=1, resident=100.0)
    frontends = [_exposition(requests=5, queue=2, ready=0, resident=10.0) for _ in range(2)]
    samples = parse_metrics(merge(device, frontends).decode())
    assert metric(samples, "fusion_requests_total", route="/predict", status="200") == 13
    assert metric(samples, "fusion_request_duration_seconds_count", route="/predict") == 3
    assert metric(samples, "fusion_request_duration_seconds_bucket", route="/predict", le="0.005") == 3
    assert metric(samples, "fusion_queue_depth", stage="decode") == 5
    assert metric(samples, "process_resident_memory_bytes") == 120
    assert metric(samples, "fusion_ready") == 1  # the device's alone: the front-ends say 0
    own = parse_metrics(device)
    created = {key: value for key, value in samples.items() if key[0].endswith("_created")}
    assert created and created == {key: value for key, value in own.items() if key[0].endswith("_created")}


def test_a_retired_front_end_leaves_its_counters_not_its_gauges() -> None:
    left = monotonic_part(_exposition(requests=4, queue=7, ready=0, resident=10.0))
    samples = parse_metrics(merge(_exposition(requests=1, queue=0, ready=1, resident=100.0), [left]).decode())
    assert metric(samples, "fusion_requests_total", route="/predict", status="200") == 5
    assert metric(samples, "fusion_queue_depth", stage="decode") == 0
    assert metric(samples, "process_resident_memory_bytes") == 100


def test_a_front_end_bound_leaves_room_for_a_running_batch_and_the_device_bound_holds() -> None:
    """A front-end counts its items until answered, running ones included, so its own bound is the
    queue bound plus a batch; the device's full queue refuses at once, whatever is counted here."""
    link = DeviceLink(Path("unused.sock"), lambda: b"", retry_after_s=1, answer_margin_s=1.0)
    metrics = Metrics(8)
    batcher = RemoteBatcher(link, max_queue=3, max_running=8, metrics=metrics)
    tickets = [batcher.admit(10.0, 10.0) for _ in range(3 + 8)]
    with pytest.raises(Overloaded, match="limit of 3 queued requests"):
        batcher.admit(10.0, 10.0)
    tickets.pop().release()
    link.device = DeviceState(liveness=None, readiness="ready", info=b"", queue_full=True)
    with pytest.raises(Overloaded):
        batcher.admit(10.0, 10.0)
    link.device = DeviceState(liveness=None, readiness="ready", info=b"")
    tickets.append(batcher.admit(10.0, 10.0))
    assert batcher.admitted == 11
    assert metric(parse_metrics(metrics.render().decode()), "fusion_requests_shed_total", reason="queue_full") == 2


def test_a_front_end_refuses_the_deadline_classes_the_devices_lateness_limits_bind() -> None:
    """The device process says which deadline classes its lateness limits refuse. A front-end
    refuses their requests before the body (by the request's whole allowance, not its time left),
    lets the others in, and answers 504 to one whose deadline has passed."""
    link = DeviceLink(Path("unused.sock"), lambda: b"", retry_after_s=1, answer_margin_s=1.0)
    metrics = Metrics(8)
    batcher = RemoteBatcher(link, max_queue=3, max_running=8, metrics=metrics)
    link.device = DeviceState(liveness=None, readiness=None, info=b"", late=(Binding(7, 4),), retry_after_s=3)
    with pytest.raises(Overloaded, match="allowing 65-128 ms are coming late") as refused:
        batcher.admit(0.01, 0.1)
    assert refused.value.retry_after_s == 3
    with pytest.raises(Overloaded):
        batcher.admit(0.3, 0.1)
    with pytest.raises(DeadlineExceeded, match="deadline passed before it could be queued"):
        batcher.admit(0.0, 0.1)
    ticket = batcher.admit(0.01, 0.2)
    assert (batcher.admitted, ticket.allowance_s) == (1, 0.2)
    assert batcher.admit(0.1, 0.2).allowance_s == 0.2  # its allowance, not its time left, classes it
    link.device = DeviceState(liveness=None, readiness=None, info=b"")
    assert batcher.admit(0.1, 0.1).allowance_s == 0.1
    samples = parse_metrics(metrics.render().decode())
    assert metric(samples, "fusion_requests_expired_total", stage="before_queue") == 1
    assert metric(samples, "fusion_requests_shed_total", reason="late") == 2


def test_an_item_past_its_deadline_on_arrival_gets_504_even_while_the_queue_is_full(
    probe_package: Path, tmp_path: Path
) -> None:
    """The time an item waits on the way to the device process (or for its loop) counts against its
    deadline; one that arrives past it is answered 504 and counted as expired, not refused as
    though the queue were what kept it, and the queued request is unharmed."""

    async def body() -> None:
        async with serve(settings_for(probe_package, max_queue=1)) as served:
            server = HandoffServer(served.state, tmp_path / "link.sock", lambda: b"")
            await server.start()
            link = DeviceLink(tmp_path / "link.sock", lambda: b"", retry_after_s=1, answer_margin_s=1.0)
            try:
                await link.connect(5)
                await until(lambda: link.device.readiness is None)
                batcher = served.batcher
                slow = asyncio.create_task(served.client.post("/predict", **form(picture(), "#" * 60)))
                await until(lambda: batcher.running == 1)
                queued = asyncio.create_task(served.client.post("/predict", **form(picture(), "queued")))
                await until(lambda: batcher.admitted == 1)  # the queue's bound: a new request gets 429
                image = np.zeros((3, 32, 32), dtype=np.uint8)
                with pytest.raises(DeadlineExceeded, match="deadline passed before it could be queued"):
                    await link.call(Kind.IMAGE, image, None, -0.001, 0.05, None)
                assert (await slow).status_code == 200 and (await queued).status_code == 200
                samples = await served.metrics()
            finally:
                await link.close()
                await server.close()
        assert metric(samples, "fusion_requests_expired_total", stage="before_queue") == 1
        assert metric(samples, "fusion_requests_shed_total", reason="queue_full") == 0

    run(body())


def test_a_link_counts_as_a_front_end_once_it_says_it_serves(tmp_path: Path) -> None:
    """A front-end links twice: once to check the device serves its package before it listens (it
    never says SERVING on that link), then for good. Only the second counts."""

    async def body() -> None:
        state = AppState(settings=Settings(), metrics=Metrics(8))
        server = HandoffServer(state, tmp_path / "link.sock", lambda: b"")
        await server.start()

        def connected() -> float:
            return metric(parse_metrics(state.metrics.render().decode()), "fusion_frontends_connected")

        links = [DeviceLink(tmp_path / "link.sock", lambda: b"", retry_after_s=1, answer_margin_s=1.0) for _ in "ab"]
        check, serving = links
        try:
            for link in links:
                await link.connect(5)
            await until(lambda: all(link.device.readiness == "loading" for link in links))  # both linked
            assert connected() == 0
            serving.announce_serving()
            await until(lambda: connected() == 1)
            await check.close()
            await asyncio.sleep(0.05)
            assert connected() == 1  # the check leaving changes nothing
            await serving.close()
            await until(lambda: connected() == 0)
        finally:
            for link in links:
                await link.close()
            await server.close()

    run(body())


def test_a_front_end_that_stops_reading_is_dropped_before_it_grows_the_device(tmp_path: Path) -> None:
    """Every state frame carries /info; a front-end that reads none of them (a stopped process)
    would have the device buffer them for ever. Past the bound the device drops its link: the
    front-end, reading again, finds the end of the stream after what had been sent."""

    async def body() -> None:
        state = AppState(settings=Settings(), metrics=Metrics(8))
        versions = itertools.count()
        # An /info that changes at every poll: a 256 KiB state frame every 50 ms, far past the bound in 2 s.
        server = HandoffServer(state, tmp_path / "link.sock", lambda: b"%08d" % next(versions) * 32768, 1 << 20)
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "link.sock"))
        try:
            await asyncio.sleep(2.0)  # reading nothing: the socket's buffers fill, then the device's
            received = 0
            async with asyncio.timeout(5):
                while chunk := await reader.read(1 << 16):
                    received += len(chunk)
            assert 0 < received < 4 << 20  # what the kernel held, and no more: the link ended
        finally:
            writer.close()
            await server.close()

    run(body())
