"""Dynamic batching under real concurrency: batches form, answers stay with their requests, one bad
item fails alone, deadlines and disconnects keep work off the device, a full queue sheds at once."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.batching import MicroBatcher, _Item, _Stage
from app.errors import ClientGone, DeadlineExceeded, ModelFailure, NotReady, Overloaded
from app.items import Kind, Row, RowResult
from app.lateness_limit import deadline_class, describe, gauge_label
from app.metrics import Metrics
from app.worker import InferenceWorker
from tests.app.conftest import Running, form, gather, metric, parse_metrics, picture, run, serve, settings_for, until

SLOW = "#" * 60  # the probe model busy-loops per '#': this batch holds the device for a while


def assert_same_prediction(answer: dict[str, Any], expected: dict[str, Any]) -> None:
    """Same labels in the same order, scores equal up to float rounding (batched kernels sum in
    another order than batch-1 kernels)."""
    assert answer["label"] == expected["label"] and answer["model"] == expected["model"]
    assert [e["label"] for e in answer["top_k"]] == [e["label"] for e in expected["top_k"]]
    scores = [e["score"] for e in answer["top_k"]]
    np.testing.assert_allclose(scores, [e["score"] for e in expected["top_k"]], atol=1e-5)


def distinct_inputs(count: int) -> list[tuple[bytes, str]]:
    """Different pictures (colour, size, format) and texts of different lengths and scripts."""
    texts = ["What shape?", "Is the red object left of the blue one?", "蓝色的物体是大还是小？", "ok", "Q" * 64]
    inputs = []
    for i in range(count):
        color = ((37 * i) % 256, (91 * i) % 256, (153 * i) % 256)
        image = picture(color=color, size=(40 + i % 7 * 9, 48), fmt="JPEG" if i % 3 == 0 else "PNG")
        inputs.append((image, f"{texts[i % len(texts)]} #{i}"[:64] if i % 5 != 4 else texts[4]))
    return inputs


async def post(served: Running, path: str, image: bytes | None, text: str | None, **extra: Any) -> httpx.Response:
    return await served.client.post(path, **form(image, text), **extra)


async def hold_the_device(served: Running) -> asyncio.Task[httpx.Response]:
    """Start a slow request and return once it is running on the device."""
    slow = asyncio.create_task(post(served, "/predict", picture(), SLOW))
    batcher = served.batcher
    assert batcher is not None
    await until(lambda: batcher.running > 0)
    return slow


def test_concurrent_requests_get_exactly_their_own_answers(tiny_package: Path) -> None:
    """64 distinct requests at once (predict and embed mixed, so they share batches) get the answers
    they get one at a time."""
    inputs = distinct_inputs(64)

    def path(i: int) -> str:
        return "/predict" if i % 2 == 0 else "/embed"

    async def body() -> None:
        async with serve(settings_for(tiny_package, max_batch_size=16, threads=2)) as served:
            alone = [(await post(served, path(i), *inputs[i])).json() for i in range(64)]
            before = metric(await served.metrics(), "fusion_batch_size_count", kind="fuse")
            together = await gather(*(post(served, path(i), *inputs[i]) for i in range(64)))
            batches = metric(await served.metrics(), "fusion_batch_size_count", kind="fuse") - before
        assert before == 64
        assert batches < 64, "no batch formed"
        for i, (single, response) in enumerate(zip(alone, together, strict=True)):
            assert response.status_code == 200, response.text
            answer = response.json()
            if path(i) == "/predict":
                assert_same_prediction(answer, single)
            else:
                for name in ("image_embedding", "text_embedding"):
                    np.testing.assert_allclose(answer[name], single[name], atol=1e-5)
                assert abs(answer["similarity"] - single["similarity"]) < 1e-5

    run(body(), timeout_s=120)


def test_batches_form_while_the_device_is_busy_and_kinds_batch_apart(probe_package: Path) -> None:
    inputs = distinct_inputs(8)

    async def body() -> None:
        # One forward call per batch (no split by text length): the token counts below are of whole batches.
        async with serve(settings_for(probe_package, call_cost_tokens="off")) as served:
            alone = [(await post(served, "/predict", *inputs[i])).json() for i in range(4)]
            start = await served.metrics()
            slow = await hold_the_device(served)
            fused = [post(served, "/predict", *inputs[i]) for i in range(4)]
            fused += [post(served, "/embed", *inputs[i]) for i in range(4, 8)]
            images = [post(served, "/embed", inputs[i][0], None) for i in range(3)]
            texts = [post(served, "/embed", None, inputs[i][1]) for i in range(3)]
            responses = await gather(*fused, *images, *texts)
            assert (await slow).status_code == 200
            end = await served.metrics()
        assert all(r.status_code == 200 for r in responses)
        for i in range(4):
            assert_same_prediction(responses[i].json(), alone[i])

        def grew(name: str, kind: str) -> float:
            return metric(end, name, kind=kind) - metric(start, name, kind=kind)

        # The slow request alone, then the 8 fused (/predict and /embed with both) in one batch.
        assert (grew("fusion_batch_size_count", "fuse"), grew("fusion_batch_size_sum", "fuse")) == (2, 9)
        assert (grew("fusion_batch_size_count", "image"), grew("fusion_batch_size_sum", "image")) == (1, 3)
        assert (grew("fusion_batch_size_count", "text"), grew("fusion_batch_size_sum", "text")) == (1, 3)
        # Texts are padded to the longest in their batch: exactly these token slots ran, this much padding.
        lengths = [len(text.encode()) for _, text in inputs]
        assert grew("fusion_batch_tokens_total", "fuse") == len(SLOW) + 8 * max(lengths)
        assert grew("fusion_batch_padding_tokens_total", "fuse") == 8 * max(lengths) - sum(lengths)
        text_lengths = lengths[:3]
        assert grew("fusion_batch_tokens_total", "text") == 3 * max(text_lengths)
        assert metric(end, "fusion_requests_within_deadline_total", route="/predict") == 4 + 1 + 4

    run(body())


def test_a_batch_of_short_and_long_texts_runs_as_two_calls_without_padding(probe_package: Path) -> None:
    """Call cost 20 tokens: 8 texts, 4 of 3 bytes and 4 of 60, cost 20 + 8 * 60 = 500 as one call and
    (20 + 4 * 3) + (20 + 4 * 60) = 292 as two. They arrive interleaved, so each call gathers
    scattered rows; every answer must still reach its own request, equal to the item run alone."""
    texts = [f"{i}ab" if i % 2 == 0 else f"{i}" * 60 for i in range(8)]
    items = [(picture(color=(30 * i, 200 - 20 * i, 90)), text) for i, text in enumerate(texts)]

    async def body() -> None:
        async with serve(settings_for(probe_package, call_cost_tokens="20")) as served:
            alone = [(await post(served, "/predict", *item)).json() for item in items]
            start = await served.metrics()
            slow = await hold_the_device(served)
            responses = await gather(*(post(served, "/predict", *item) for item in items))
            assert (await slow).status_code == 200
            end = await served.metrics()
            info = (await served.client.get("/info")).json()
        for response, expected in zip(responses, alone, strict=True):
            assert response.status_code == 200, response.text
            assert_same_prediction(response.json(), expected)

        def grew(name: str) -> float:
            return metric(end, name, kind="fuse") - metric(start, name, kind="fuse")

        assert (grew("fusion_batch_size_count"), grew("fusion_batch_size_sum")) == (2, 9)  # the slow one, then 8
        assert grew("fusion_batch_calls_total") == 1 + 2
        assert grew("fusion_batch_tokens_total") == len(SLOW) + 4 * 3 + 4 * 60
        assert grew("fusion_batch_padding_tokens_total") == 0
        assert info["batching"]["call_cost_tokens"] == {"fuse": 20.0, "text": 20.0}
        assert metric(end, "fusion_call_cost_tokens", kind="fuse") == 20.0

    run(body())


def test_a_bad_item_fails_its_length_group_alone(probe_package: Path) -> None:
    """The same split, with one long text that makes the model raise: the short group runs once and
    is fine; the long group fails, then its halves [!, 3] and [5, 7], then [!] and [3] alone. Rows
    run: 4 + 4 + 2 + 2 + 1 + 1 = 14, one batch failure (the long group), one 500."""
    texts = [f"{i}ab" if i % 2 == 0 else f"{i}" * 60 for i in range(8)]
    texts[1] = "!" * 60
    items = [(picture(color=(30 * i, 200 - 20 * i, 90)), text) for i, text in enumerate(texts)]

    async def body() -> None:
        async with serve(settings_for(probe_package, call_cost_tokens="20")) as served:
            alone = {i: (await post(served, "/predict", *item)).json() for i, item in enumerate(items) if i != 1}
            start = await served.metrics()
            slow = await hold_the_device(served)
            responses = await gather(*(post(served, "/predict", *item) for item in items))
            assert (await slow).status_code == 200
            end = await served.metrics()
        assert responses[1].status_code == 500 and responses[1].json()["error"]["code"] == "model_failure"
        for i, expected in alone.items():
            assert responses[i].status_code == 200, responses[i].text
            assert_same_prediction(responses[i].json(), expected)

        def grew(name: str) -> float:
            return metric(end, name, kind="fuse") - metric(start, name, kind="fuse")

        assert grew("fusion_batch_calls_total") == 1 + 2
        assert grew("fusion_items_executed_total") == 1 + 14
        assert grew("fusion_batch_failures_total") == 1
        assert grew("fusion_model_failures_total") == 1

    run(body())


def test_one_bad_item_fails_alone_and_its_batch_peers_are_correct(probe_package: Path) -> None:
    good = distinct_inputs(5)
    bad = ["!raise in the model", "~nan logits", "^wrong output shape"]

    async def body() -> None:
        # One call per batch: the failure counts below are of the whole batch and its halves.
        async with serve(settings_for(probe_package, call_cost_tokens="off")) as served:
            alone = [(await post(served, "/predict", *item)).json() for item in good]
            slow = await hold_the_device(served)
            requests = [post(served, "/predict", *item) for item in good]
            requests += [post(served, "/predict", picture(), text) for text in bad]
            requests += [post(served, "/embed", None, "!text encoder raises"), post(served, "/embed", None, "fine")]
            responses = await gather(*requests)
            assert (await slow).status_code == 200
            assert (await served.client.get("/readyz")).status_code == 200
            samples = await served.metrics()
        for response, expected in zip(responses[:5], alone, strict=True):
            assert response.status_code == 200
            assert_same_prediction(response.json(), expected)
        for response in (*responses[5:8], responses[8]):
            assert response.status_code == 500
            error = response.json()["error"]
            assert error["code"] == "model_failure" and "Traceback" not in response.text
        assert responses[9].status_code == 200 and len(responses[9].json()["text_embedding"]) == 16
        assert metric(samples, "fusion_model_failures_total", kind="fuse") == 3
        assert metric(samples, "fusion_model_failures_total", kind="text") == 1
        assert metric(samples, "fusion_batch_failures_total", kind="fuse") == 1

    run(body())


def test_a_passed_deadline_is_never_run(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            seen = await served.rows_seen()
            slow = await hold_the_device(served)
            late = await post(served, "/predict", picture(), "too late", headers={"X-Request-Timeout-Ms": "50"})
            assert not slow.done(), "the deadline should have passed while the device was busy"
            assert late.status_code == 504
            assert late.json()["error"]["code"] == "deadline_exceeded"
            assert (await slow).status_code == 200
            assert await served.rows_seen() == seen + 1  # only the slow request reached the model
            samples = await served.metrics()
        assert metric(samples, "fusion_requests_expired_total", stage="queue") == 1
        assert metric(samples, "fusion_requests_total", route="/predict", status="504") == 1

    run(body())


def test_under_load_a_request_the_queue_ahead_would_keep_past_its_deadline_is_refused_at_once(
    probe_package: Path,
) -> None:
    """Admission weighs a request's deadline against the work ahead of it (items on the device and
    admitted, at the running time per item) once a full batch or more is admitted ahead: one that
    would wait past its deadline gets 429 before its body is read, and never runs. On an idle
    server the same deadline is admitted (the estimate, from one slow item, overstates a quick one)."""

    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            batcher = served.batcher
            assert (await post(served, "/predict", picture(), SLOW)).status_code == 200  # times an item
            per_item = batcher.expected_wait_s()  # nothing ahead: its own item
            assert per_item > 0.1
            short = {"X-Request-Timeout-Ms": str(round(per_item * 1000))}
            assert (await post(served, "/predict", picture(), "idle", headers=short)).status_code == 200
            per_item = batcher.expected_wait_s()
            seen = await served.rows_seen()
            slow = await hold_the_device(served)
            queued = [asyncio.create_task(post(served, "/predict", picture(), f"queued {i}")) for i in range(8)]
            await until(lambda: batcher.admitted == 8)  # a full batch ahead: under load
            assert batcher.expected_wait_s() == 10 * per_item  # the slow one, the 8, then its own
            short = {"X-Request-Timeout-Ms": str(round(5 * per_item * 1000))}
            refused = await post(served, "/predict", picture(), "in a hurry", headers=short)
            assert not slow.done()
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "overloaded"
            assert "deadline" in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) >= 1
            assert [r.status_code for r in await gather(slow, *queued)] == [200] * 9
            assert await served.rows_seen() == seen + 9  # the slow one and the 8 queued
            samples = await served.metrics()
        assert metric(samples, "fusion_requests_shed_total", reason="deadline") == 1
        assert metric(samples, "fusion_requests_total", route="/predict", status="429") == 1

    run(body())


def test_a_request_that_its_batch_would_answer_too_late_is_answered_504_before_it_runs(probe_package: Path) -> None:
    """When its batch is taken, a request whose deadline would pass before that batch ends (by the
    running estimate for the batch's shape) is answered 504 at once and never runs, while one with
    time enough runs; a lone such request runs all the same (the estimate may be what is wrong)."""

    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            batcher = served.batcher
            slow = await hold_the_device(served)  # then a batch of two slow texts, timed
            pair = await gather(*(post(served, "/predict", picture(), SLOW) for _ in range(2)))
            assert [r.status_code for r in pair] == [200, 200]
            assert (await slow).status_code == 200
            one, two = (batcher.expected_seconds(Kind.FUSE, size, len(SLOW)) for size in (1, 2))
            assert one is not None and two is not None and min(one, two) > 0.1
            seen = await served.rows_seen()
            slow = await hold_the_device(served)
            # Queued behind the slow batch, with the quick one: when that ends (after about `one`),
            # half of a batch of two slow texts' time is left to it.
            timeout = {"X-Request-Timeout-Ms": str(round((one + two / 2) * 1000))}
            late = asyncio.create_task(post(served, "/predict", picture(), SLOW, headers=timeout))
            await until(lambda: batcher.queued == 1)
            quick = asyncio.create_task(post(served, "/predict", picture(), "#"))
            answers = await gather(late, quick)
            assert [a.status_code for a in answers] == [504, 200]
            assert answers[0].json()["error"]["code"] == "deadline_exceeded"
            assert (await slow).status_code == 200
            assert await served.rows_seen() == seen + 2  # the slow one and the quick one
            # Alone, with less time than its estimate: nothing else could use the device, so it runs.
            lone = {"X-Request-Timeout-Ms": str(round(0.8 * one * 1000))}
            assert (await post(served, "/predict", picture(), SLOW, headers=lone)).status_code == 200
            samples = await served.metrics()
        assert metric(samples, "fusion_requests_expired_total", stage="cannot_finish") == 1
        assert metric(samples, "fusion_requests_expired_total", stage="queue") == 0

    run(body())


def test_answers_coming_late_lower_the_admission_limit_and_beyond_it_requests_get_429(probe_package: Path) -> None:
    """When a deadline class's answers come past their deadlines, the server lets fewer of its
    requests in at once: six 504s in a row (over 5 % of the class's recent answers late), with four
    requests in the server, drop the class's limit to 0.8 of those four, and its next request is
    refused at once. A 504 to a request that allowed less than the fastest batch of its kind took
    does not count, nor do answers to requests let in before the drop. A request of another class
    (the default deadline) is let in beyond the limit; an answer on time after a refusal raises it."""

    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            batcher = served.batcher
            assert (await post(served, "/predict", picture(), "#" * 10)).status_code == 200  # the fastest batch
            first = await hold_the_device(served)
            patient = [asyncio.create_task(post(served, "/predict", picture(), SLOW)) for _ in range(4)]
            await until(lambda: batcher.queued == 4)
            assert (await first).status_code == 200
            await until(lambda: batcher.running == 4)  # one batch of four slow texts: four times the first
            fastest_ms = batcher._fastest[Kind.FUSE] * 1000  # the batch of ten marks, about 30 ms
            shorter = {"X-Request-Timeout-Ms": str(int(fastest_ms / 2))}
            longer_ms = max(60, int(fastest_ms * 1.5))
            longer = {"X-Request-Timeout-Ms": str(longer_ms)}
            key = deadline_class(longer_ms / 1000)
            hopeless = await post(served, "/predict", picture(), "hopeless", headers=shorter)
            assert hopeless.status_code == 504
            limits = batcher.lateness.limits
            assert {(limit.limit, limit.late_share) for limit in limits.values()} == {(272, 0.0)}  # 256 + 2 x 8
            for i in range(6):
                hurried = await post(served, "/predict", picture(), f"hurried {i}", headers=longer)
                assert hurried.status_code == 504
                assert limits[key].limit == (272 if i < 5 else 3.2)
            refused = await post(served, "/predict", picture(), "one more", headers=longer)
            assert not any(task.done() for task in patient)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "overloaded"
            assert refused.json()["error"]["message"] == (
                f"the server's answers to requests {describe(key)} are coming late: until they are on time again,"
                " it lets such requests in while fewer than 4 are in the server"
            )
            assert int(refused.headers["retry-after"]) >= 1
            free = asyncio.create_task(post(served, "/predict", picture(), "no deadline of its own"))
            await until(lambda: batcher.in_server == 5)  # let in beyond the other class's limit
            assert [r.status_code for r in await gather(*patient)] == [200] * 4
            assert (await free).status_code == 200
            assert limits[key].limit == 3.2  # answers on time, but let in before the drop, or of another class
            # On time, of the class, let in after the drop, and the limit refused one since: it grows by 1 / 3.2.
            widest = {"X-Request-Timeout-Ms": str(2**key)}  # the class's longest allowance
            assert (await post(served, "/predict", picture(), "alone", headers=widest)).status_code == 200
            assert limits[key].limit == 3.5125
            assert (await post(served, "/predict", picture(), "alone again", headers=widest)).status_code == 200
            assert limits[key].limit == 3.5125  # nobody held back since, and the server was empty
            samples = await served.metrics()
        assert metric(samples, "fusion_requests_shed_total", reason="late") == 1
        assert metric(samples, "fusion_admission_limit", allowing_ms=gauge_label(key)) == 3.5125
        # The default 10 s: at its ceiling, or capped at 2^k times the class's limit, k classes looser
        # (the class is the one ten marks took 1.5 times of: slower machines put it higher).
        default_ceiling = min(272, 3.5125 * 2 ** (deadline_class(10.0) - key))
        assert metric(samples, "fusion_admission_limit", allowing_ms="8193-16384") == default_ceiling
        assert metric(samples, "fusion_requests_expired_total", stage="queue") == 7

    run(body())


async def raw_call(app: Any, request: httpx.Request, disconnect: asyncio.Event) -> list[dict[str, Any]]:
    """Call the ASGI app as a server would, for a client that sends its body and may then leave."""
    body = request.read()
    delivered = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.url.path,
        "raw_path": request.url.raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.headers.raw],
        "client": ("127.0.0.1", 40000),
        "server": ("fusion.test", 80),
    }
    await app(scope, receive, send)
    return sent


def test_a_disconnected_clients_request_is_not_run(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            seen = await served.rows_seen()
            slow = await hold_the_device(served)
            request = httpx.Request("POST", "http://fusion.test/predict", **form(picture(), "leaving"))
            gone = asyncio.Event()
            leaving = asyncio.create_task(raw_call(served.app, request, gone))
            batcher = served.batcher
            assert batcher is not None
            await until(lambda: batcher.queued == 1)
            gone.set()
            messages = await leaving
            assert not slow.done(), "the client left while its request was queued"
            assert messages[0]["status"] == 499
            assert (await slow).status_code == 200
            assert await served.rows_seen() == seen + 1
            samples = await served.metrics()
        assert metric(samples, "fusion_requests_cancelled_total", reason="client_disconnected") == 1

    run(body())


def test_a_full_queue_sheds_at_once_with_retry_after(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package, max_queue=2)) as served:
            slow = await hold_the_device(served)
            queued = [asyncio.create_task(post(served, "/predict", picture(), f"queued {i}")) for i in range(2)]
            batcher = served.batcher
            assert batcher is not None
            await until(lambda: batcher.admitted == 2)
            shed = await post(served, "/predict", picture(), "one too many")
            assert shed.status_code == 429 and not slow.done()
            assert shed.json()["error"]["code"] == "overloaded"
            assert shed.headers["retry-after"] == str(batcher.retry_after_s())  # the device is held: no batch ends
            # A request that is wrong in itself says so whatever the load: a retry would not mend it.
            invalid = await post(served, "/predict", picture(), "bad", headers={"X-Request-Timeout-Ms": "0"})
            assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_timeout"
            assert [r.status_code for r in await gather(slow, *queued)] == [200, 200, 200]
            assert (await post(served, "/predict", picture(), "room again")).status_code == 200
            samples = await served.metrics()
        assert metric(samples, "fusion_requests_shed_total", reason="queue_full") == 1

    run(body())


def test_draining_reports_not_ready_but_keeps_serving(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            served.state.begin_drain()
            ready = await served.client.get("/readyz")
            assert ready.status_code == 503 and ready.json() == {"status": "not_ready", "reason": "draining"}
            answer = await post(served, "/predict", picture(), "still served")
            assert answer.status_code == 200
            assert answer.headers["connection"] == "close"  # keep-alive clients move to another replica
            assert (await served.client.get("/healthz")).status_code == 200

    run(body())


def test_texts_are_padded_to_the_longest_in_the_batch() -> None:
    images = np.zeros((4, 3, 2, 2), dtype=np.uint8)
    tokens = np.zeros((4, 10), dtype=np.int64)
    stage = _Stage(images, tokens)

    def item(length: int, fill: int) -> _Item:
        ids = np.full(length, fill, dtype=np.int64)
        image = np.full((3, 2, 2), fill, dtype=np.uint8)
        return _Item(Kind.FUSE, image, ids, length, 0.0, 0.0, 0.0, None, None)  # type: ignore[arg-type]

    for length, fill in ((3, 7), (9, 8), (5, 9)):
        stage.add(item(length, fill))
    batch_images, batch_tokens = stage.views()
    assert batch_images is not None and batch_tokens is not None
    assert batch_tokens.shape == (3, 9)  # the longest text, not the model's maximum
    assert batch_tokens[0].tolist() == [7, 7, 7] + [0] * 6
    assert batch_images[:, 0, 0, 0].tolist() == [7, 8, 9]
    stage.keep([0, 2])  # the middle request left before running
    batch_images, batch_tokens = stage.views()
    assert batch_tokens is not None and batch_images is not None
    assert batch_tokens.tolist() == [[7, 7, 7, 0, 0], [9, 9, 9, 9, 9]]
    assert batch_images[:, 0, 0, 0].tolist() == [7, 9]
    stage.items = []
    stage.add(item(2, 5))  # a reused buffer holds nothing of earlier, longer texts
    assert stage.tokens is not None and stage.tokens[0].tolist() == [5, 5] + [0] * 8


def test_max_wait_holds_an_idle_device_for_a_fuller_batch(probe_package: Path) -> None:
    async def staggered(served: Running) -> float:
        before = metric(await served.metrics(), "fusion_batch_size_count", kind="fuse")

        async def later(delay: float, i: int) -> httpx.Response:
            await asyncio.sleep(delay)
            return await post(served, "/predict", picture(), f"staggered {i}")

        responses = await gather(*(later(0.03 * i, i) for i in range(3)))
        assert [r.status_code for r in responses] == [200] * 3
        return metric(await served.metrics(), "fusion_batch_size_count", kind="fuse") - before

    async def body() -> None:
        async with serve(settings_for(probe_package, max_wait_ms=1000)) as served:
            assert await staggered(served) == 1  # one batch of three
        async with serve(settings_for(probe_package, max_wait_ms=0)) as served:
            assert await staggered(served) == 3  # no added wait: each ran at once

    run(body())


def test_a_request_still_arriving_when_the_device_frees_joins_the_next_batch(probe_package: Path) -> None:
    """One request waits in the queue behind a slow batch; a second one is admitted but its body is
    still arriving when the device frees. With gather_ms the dispatcher waits for it, and both run
    in one batch; without, the first runs alone at once and the second after it."""

    async def late_upload(served: Running, slow: asyncio.Task[httpx.Response]) -> httpx.Response:
        request = served.client.build_request("POST", "/predict", **form(picture(), "late"))
        body = request.read()

        async def chunks() -> AsyncIterator[bytes]:
            yield body[:100]
            await slow  # the device is free (the slow batch answered); the rest comes 50 ms later
            await asyncio.sleep(0.05)
            yield body[100:]

        headers = {"content-type": request.headers["content-type"], "content-length": str(len(body))}
        return await served.client.post("/predict", content=chunks(), headers=headers)

    async def batches(gather_ms: float) -> float:
        async with serve(settings_for(probe_package, gather_ms=gather_ms)) as served:
            batcher = served.batcher
            assert batcher is not None
            slow = await hold_the_device(served)
            before = metric(await served.metrics(), "fusion_batch_size_count", kind="fuse")  # counted when done
            queued = asyncio.create_task(post(served, "/predict", picture(), "queued"))
            await until(lambda: batcher.queued == 1)
            late = asyncio.create_task(late_upload(served, slow))
            await until(lambda: batcher.decoding == 1)
            responses = await gather(slow, queued, late)
            assert [r.status_code for r in responses] == [200, 200, 200]
            return metric(await served.metrics(), "fusion_batch_size_count", kind="fuse") - before

    async def body() -> None:
        assert await batches(gather_ms=1000) == 2  # the slow batch, then both together
        assert await batches(gather_ms=0) == 3  # the slow batch, the queued one alone, the late one

    run(body())


def test_gather_adds_no_wait_when_nothing_is_decoding(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package, gather_ms=1000)) as served:
            began = time.perf_counter()
            for i in range(3):
                assert (await post(served, "/predict", picture(), f"alone {i}")).status_code == 200
            assert time.perf_counter() - began < 1.0  # three 1-second gathers would take 3 s

    run(body())


def test_the_next_batch_is_handed_to_the_device_before_the_running_one_ends(probe_package: Path) -> None:
    """With lookahead_ms, a request queued behind a slow batch is handed to the inference thread
    lookahead_ms before that batch is expected to end, but never before half its expected duration
    (here the lookahead is longer than the batch: the window opens halfway, not at once), so that
    it starts the moment the device frees; from then it counts as running, and it gets its own
    answer. Without, it waits in the queue until the slow batch has ended."""

    async def most_running(lookahead_ms: float) -> tuple[int, int]:
        async with serve(settings_for(probe_package, lookahead_ms=lookahead_ms)) as served:
            batcher = served.batcher
            assert batcher is not None
            for _ in range(2):  # times slow batches of one (texts of 60 tokens)
                assert (await post(served, "/predict", picture(), SLOW)).status_code == 200
            expected = batcher.expected_seconds(Kind.FUSE, 1, len(SLOW))
            assert expected is not None and expected > 0.1
            assert batcher.expected_seconds(Kind.FUSE, 1, 3) is None  # short texts: another shape
            slow = await hold_the_device(served)
            queued = asyncio.create_task(post(served, "/predict", picture(), "queued"))
            await until(lambda: batcher.queued == 1 or batcher.running == 2)
            at_first = batcher.running
            most = at_first
            while not slow.done():
                most = max(most, batcher.running)
                await asyncio.sleep(0.002)
            responses = await gather(slow, queued)
            assert [r.status_code for r in responses] == [200, 200]
            alone = await post(served, "/predict", picture(), "queued")
            assert_same_prediction(responses[1].json(), alone.json())
            return at_first, most

    async def body() -> None:
        assert await most_running(lookahead_ms=1000) == (1, 2)  # queued first, handed over before the end
        assert await most_running(lookahead_ms=0) == (1, 1)

    run(body())


def test_requests_in_a_batch_handed_over_early_are_answered_before_it_starts(probe_package: Path) -> None:
    """A batch handed to the inference thread early waits behind the running one. A request in it
    whose deadline passes there gets its 504 at the deadline, one whose client leaves gets 499 at
    once, and one cancelled outright leaves too, all while the batch ahead still runs; with nobody
    left in it, the batch is skipped: the model sees the slow request's row only."""

    timed, longer = "#" * 40, "#" * 64  # one estimate (texts of 33-64 tokens); the second runs 1.6 times longer

    async def body() -> None:
        async with serve(settings_for(probe_package, lookahead_ms=1000)) as served:
            batcher = served.batcher
            for _ in range(3):  # times slow batches of one: the window opens at half their time
                assert (await post(served, "/predict", picture(), timed)).status_code == 200
            expected = batcher.expected_seconds(Kind.FUSE, 1, len(timed))
            assert expected is not None and expected > 0.1
            assert batcher.expected_seconds(Kind.FUSE, 1, len(longer)) == expected
            seen = await served.rows_seen()
            slow = asyncio.create_task(post(served, "/predict", picture(), longer))
            await until(lambda: batcher.running > 0)
            # The deadline passes after the window opens (half the estimate), well before the
            # longer batch ends (1.6 times the estimate): the margins hold if one timing is off by 40 %.
            timeout = {"X-Request-Timeout-Ms": str(round(expected * 0.9 * 1000))}
            late = asyncio.create_task(post(served, "/predict", picture(), "short", headers=timeout))
            gone = asyncio.Event()
            request = httpx.Request("POST", "http://fusion.test/predict", **form(picture(), "leaves"))
            leaving = asyncio.create_task(raw_call(served.app, request, gone))
            cancelled = asyncio.create_task(post(served, "/predict", picture(), "cancelled"))
            await until(lambda: batcher.running == 4)  # all three handed over, behind the slow one
            answer = await late
            assert not slow.done(), "the deadline passed while the batch waited behind the slow one"
            assert answer.status_code == 504 and answer.json()["error"]["code"] == "deadline_exceeded"
            gone.set()
            messages = await leaving
            assert messages[0]["status"] == 499
            cancelled.cancel()  # the request itself cancelled (its server task stopped): the last one
            await asyncio.gather(cancelled, return_exceptions=True)
            assert not slow.done()
            assert (await slow).status_code == 200
            await until(lambda: batcher.idle)
            assert await served.rows_seen() == seen + 1  # the batch behind it was skipped
            samples = await served.metrics()
        assert metric(samples, "fusion_requests_expired_total", stage="handed_over") == 1
        assert metric(samples, "fusion_requests_cancelled_total", reason="client_disconnected") == 1

    run(body())


def test_a_batch_that_ends_as_the_grace_period_does_is_delivered_and_takes_no_next_one(probe_package: Path) -> None:
    """Shutdown stops the dispatcher when the grace period is over. A batch whose pass had returned
    by then, but whose answers had not been handed out yet, is delivered, not failed 503; and its
    delivery takes no next batch: the request queued behind it gets 503 and never runs, so no pass
    that nobody waits for starts after the grace period."""

    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            batcher = served.batcher
            assert (await post(served, "/predict", picture(), SLOW)).status_code == 200
            expected = batcher.expected_seconds(Kind.FUSE, 1, len(SLOW))
            assert expected is not None
            slow = await hold_the_device(served)
            queued = asyncio.create_task(post(served, "/predict", picture(), "quick"))
            await until(lambda: batcher.queued == 1)
            ran = metric(await served.metrics(), "fusion_items_executed_total", kind="fuse")
            # The event loop is held (no await) until the pass has surely returned: its results wait
            # for the loop, and the grace period (0 s) is over when the loop next looks.
            time.sleep(3 * expected + 0.5)
            await batcher.stop(0)
            assert batcher.running == 0  # nothing handed to the device on the way out
            delivered = await slow
            assert delivered.status_code == 200, delivered.text
            answer = await queued
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "not_ready"
            await asyncio.sleep(2 * expected)  # time for a pass to start, had one been handed over
            assert metric(await served.metrics(), "fusion_items_executed_total", kind="fuse") == ran

    run(body())


def test_an_item_that_cannot_be_staged_leaves_nothing_queued_past_its_deadline(probe_package: Path) -> None:
    """A fuse item without an image fails to stage (its request gets the error); its deadline timer
    must not then drop what was never queued, which would leave the lane's count below zero."""

    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            batcher = served.batcher
            assert batcher is not None
            ticket = batcher.admit(0.05, 0.05)
            deadline = asyncio.get_running_loop().time() + 0.05
            try:
                with pytest.raises(AssertionError):
                    await batcher.run(ticket, Kind.FUSE, None, np.array([104, 105], dtype=np.int64), deadline)
            finally:
                ticket.release()
            await asyncio.sleep(0.15)  # past its deadline
            assert (batcher.queued, batcher.admitted, batcher.idle) == (0, 0, True)
            answer = await asyncio.wait_for(post(served, "/predict", picture(), "after it"), 10)
            assert answer.status_code == 200

    run(body())


@contextlib.asynccontextmanager
async def text_batcher(
    run_batch: Callable[[Kind, Any, Any], list[RowResult]], on_batch: Callable[[bool], None] | None = None
) -> AsyncIterator[MicroBatcher]:
    """A batcher on a real inference thread, without the app: `run_batch` stands in for the model."""
    shapes = MicroBatcher.buffer_shapes(4, (8, 8), 16)
    buffers = {
        kind: [(np.zeros(i, np.uint8) if i else None, np.zeros(t, np.int64) if t else None) for _ in range(2)]
        for kind, (i, t) in shapes.items()
    }
    worker = InferenceWorker(threads=1)
    worker.start()
    batcher = MicroBatcher(
        run=run_batch,
        executor=worker,
        buffers=buffers,
        max_batch_size=4,
        max_wait_s=0,
        max_queue=8,
        metrics=Metrics(4),
        on_batch=on_batch,
    )
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop(1)
        worker.shutdown()


def embeddings(kind: Kind, images: Any, tokens: Any) -> list[RowResult]:
    return [Row(text_embedding=np.zeros(4, dtype=np.float32)) for _ in range(len(tokens))]


class GatedModel:
    """A stand-in model (as `embeddings`) whose passes wait until `gate` is set: one holds the
    device, or hangs, for as long as a test needs. It records each batch's size."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, kind: Kind, images: Any, tokens: Any) -> list[RowResult]:
        self.sizes.append(len(tokens))
        self.gate.wait(10)
        return embeddings(kind, images, tokens)


async def embed_text(batcher: MicroBatcher) -> Row:
    deadline = asyncio.get_running_loop().time() + 10
    return await batcher.run(batcher.admit(10.0, 10.0), Kind.TEXT, None, np.arange(1, 6, dtype=np.int64), deadline)


def test_admission_answers_504_to_a_request_whose_deadline_has_passed_even_while_the_queue_is_full() -> None:
    """Time spent before admission (the head arriving slowly, the loop busy) is not the queue's
    doing: such a request gets 504, counted as expired before the queue, not shed, whatever a
    retry would meet; with time left it is refused 429 as the queue is full."""

    async def body() -> None:
        async with text_batcher(embeddings) as batcher:
            tickets = [batcher.admit(1.0, 1.0) for _ in range(8)]  # max_queue
            with pytest.raises(DeadlineExceeded, match="deadline passed before it could be queued"):
                batcher.admit(0.0, 1.0)
            with pytest.raises(Overloaded, match="at its limit of 8 queued requests"):
                batcher.admit(0.001, 1.0)
            for ticket in tickets:
                ticket.release()
            assert (batcher.admitted, tickets[0].allowance_s) == (0, 1.0)
            samples = parse_metrics(batcher.metrics.render().decode())
            assert metric(samples, "fusion_requests_expired_total", stage="before_queue") == 1
            assert metric(samples, "fusion_requests_shed_total", reason="queue_full") == 1

    run(body())


def test_a_stale_estimate_is_run_through_though_a_request_that_has_left_could_have_waited_for_it() -> None:
    """When no queued request could finish by the batch's estimate (one slow run of its shape), the
    batch runs as it is, and its time corrects the estimate. A request that has left the overflow
    (its client gone) has a deadline too, but no longer counts as one that could make it."""
    model = GatedModel()

    async def body() -> None:
        async with text_batcher(model) as batcher:
            loop = asyncio.get_running_loop()
            texts = np.arange(1, 6, dtype=np.int64)

            async def request(seconds: float, gone: asyncio.Future[None] | None = None) -> Row:
                ticket = batcher.admit(seconds, seconds)
                try:
                    return await batcher.run(ticket, Kind.TEXT, None, texts, loop.time() + seconds, gone)
                finally:
                    ticket.release()

            holder = asyncio.create_task(request(30.0))
            await until(lambda: batcher.running == 1)
            batcher._durations[(Kind.TEXT, 4, 8)] = 5.0  # stale: a full batch of short texts took 5 s once
            tight = [asyncio.create_task(request(1.0)) for _ in range(4)]  # the filling buffer
            gone: asyncio.Future[None] = loop.create_future()
            patient = asyncio.create_task(request(100.0, gone))  # the overflow
            await until(lambda: batcher.queued == 5)
            gone.set_result(None)  # its client leaves
            with pytest.raises(ClientGone):
                await patient
            model.gate.set()
            assert all(isinstance(row, Row) for row in await gather(holder, *tight))
            samples = parse_metrics(batcher.metrics.render().decode())
            assert metric(samples, "fusion_requests_expired_total", stage="cannot_finish") == 0
        assert model.sizes == [1, 4]

    run(body())


def test_an_item_that_fails_to_stage_from_the_overflow_fails_alone_and_the_loop_goes_on() -> None:
    """Items that do not fit the filling buffer are staged later, from the overflow. Should one fail
    there (a bug: here a text longer than the buffers), its request gets 500, the others are
    served, and it is not left counted as queued, which would spin the dispatcher for good."""
    model = GatedModel()

    async def body() -> None:
        async with text_batcher(model) as batcher:
            holder = asyncio.create_task(embed_text(batcher))
            await until(lambda: batcher.running == 1)
            fitting = [asyncio.create_task(embed_text(batcher)) for _ in range(4)]  # the filling buffer
            await until(lambda: batcher.queued == 4)
            deadline = asyncio.get_running_loop().time() + 10
            ticket = batcher.admit(10.0, 10.0)
            too_long = asyncio.create_task(
                batcher.run(ticket, Kind.TEXT, None, np.arange(1, 21, dtype=np.int64), deadline)  # 20 > 16
            )
            await until(lambda: batcher.queued == 5)
            model.gate.set()
            with pytest.raises(ModelFailure, match="could not be queued"):
                await too_long
            ticket.release()
            assert all(isinstance(row, Row) for row in await gather(holder, *fitting))
            assert (batcher.queued, batcher.admitted, batcher.idle) == (0, 0, True)
            assert isinstance(await embed_text(batcher), Row)

    run(body())


def test_a_dispatcher_that_stops_on_an_error_fails_the_queue_at_once_and_refuses_new_requests() -> None:
    """A bug in the dispatcher must not leave requests waiting for their deadlines while nothing
    takes batches: the queued ones get 503, new ones are refused, and `broken` says why."""

    def no_lane() -> None:
        raise RuntimeError("a bug")

    async def body() -> None:
        async with text_batcher(embeddings) as batcher:
            before = batcher.broken
            assert before is None
            batcher._oldest_lane = no_lane  # type: ignore[method-assign]
            with pytest.raises(NotReady, match="the batcher has stopped taking batches"):
                await embed_text(batcher)
            assert batcher.broken == "the batcher has stopped taking batches"
            refused = batcher.refusal(10.0, 10.0)
            assert isinstance(refused, NotReady) and refused.retry_after_s == 1
            assert (batcher.queued, batcher.admitted) == (0, 0)

    run(body())


def test_a_drain_does_not_wait_for_a_batch_abandoned_to_a_hung_pass() -> None:
    """Its requests were answered when the watchdog tripped; waiting for the pass to return would
    only hold the process past its grace period, and the orchestrator's restart with it."""
    hangs = GatedModel()

    async def body() -> None:
        async with text_batcher(hangs) as batcher:
            try:
                hung = asyncio.create_task(embed_text(batcher))
                await until(lambda: batcher.running == 1)
                batcher.abandon(running=ModelFailure("hung"), queued=NotReady("not responding"))
                with pytest.raises(ModelFailure):
                    await hung
                assert batcher.idle
                began = time.monotonic()
                await batcher.stop(5.0)
                assert time.monotonic() - began < 1.0
            finally:
                hangs.gate.set()  # the pass returns after all, before the worker shuts down

    run(body())


def test_retry_after_is_the_batches_ahead_at_the_running_batch_time() -> None:
    """The admitted requests' batches and the running one, at the running estimate of a batch's
    time, in whole seconds up: 9 admitted at batch size 4 is 3 batches and 1 running, 4 x 0.7 s = 3."""

    async def body() -> None:
        async with text_batcher(embeddings) as batcher:
            assert batcher.retry_after_s() == 1  # nothing measured, nothing queued: at least 1
            batcher.admitted, batcher._batch_seconds = 9, 0.7
            assert batcher.retry_after_s() == 3
            batcher._batch_seconds = 0.75
            assert batcher.retry_after_s() == 3
            batcher._batch_seconds = 0.76
            assert batcher.retry_after_s() == 4
            batcher.admitted = 0

    run(body())


def test_requests_left_when_the_grace_period_ends_are_told_when_to_retry() -> None:
    """The one queued and the one still running both get 503 with Retry-After: another replica
    (or this one, restarted) takes them, and a client backs off by the server's word."""
    held = GatedModel()

    async def body() -> None:
        async with text_batcher(held) as batcher:
            try:
                running = asyncio.create_task(embed_text(batcher))
                await until(lambda: batcher.running == 1)
                queued = asyncio.create_task(embed_text(batcher))
                await until(lambda: batcher.queued == 1)
                await batcher.stop(0)
                for task in (running, queued):
                    with pytest.raises(NotReady, match="^the server is shutting down$") as refused:
                        await task
                    assert refused.value.retry_after_s == 1
                    assert refused.value.code == "not_ready"
            finally:
                held.gate.set()

    run(body())


def test_a_batch_is_answered_one_turn_of_a_busy_event_loop_after_its_pass_returns() -> None:
    """Under load every turn of the event loop is a burst of other requests' work. The answers of a
    batch reach their requests in the loop's first turns after the pass returns: its delivery is
    scheduled straight from the inference thread, not passed along a chain of futures and task
    wake-ups, each of which waits one more turn."""
    turn_s = 0.005
    returned: list[float] = []

    def run_batch(kind: Kind, images: Any, tokens: Any) -> list[RowResult]:
        returned.append(time.perf_counter())
        return embeddings(kind, images, tokens)

    async def busy_loop() -> None:
        while True:  # each turn of the loop costs turn_s (the GIL is free meanwhile, as in a decode)
            time.sleep(turn_s)
            await asyncio.sleep(0)

    async def body() -> list[float]:
        async with text_batcher(run_batch) as batcher:
            busy = asyncio.create_task(busy_loop())
            delays = []
            for _ in range(7):
                await embed_text(batcher)
                delays.append(time.perf_counter() - returned[-1])
            busy.cancel()
        return delays

    delays = run(body())
    # One turn to deliver, one for the request's own task to resume, and the turn under way when
    # the pass returned: at most three turns. A chain of futures took five or more.
    assert sorted(delays)[len(delays) // 2] < 3 * turn_s + 0.002, delays


def test_a_delivery_that_fails_leaves_the_batcher_dispatching() -> None:
    """A bug in delivering one batch (here the health monitor's callback raises) is logged by the
    event loop, and the next request is still dispatched and answered."""
    calls = []

    def on_batch(answered: bool) -> None:
        calls.append(answered)
        if len(calls) == 1:
            raise ValueError("the first delivery fails")

    async def body() -> None:
        async with text_batcher(embeddings, on_batch) as batcher:
            await asyncio.wait_for(embed_text(batcher), 5)  # answered before the callback raised
            row = await asyncio.wait_for(embed_text(batcher), 5)
            assert row.text_embedding is not None

    run(body())
    assert calls == [True, True]
