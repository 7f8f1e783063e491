"""Model faults: out of memory (split the batch, 500 out_of_memory only alone), a hung forward pass (the watchdog),
and a model that keeps failing (readiness), through the app's lifespan with the probe model."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from app.engine import Engine, is_device_lost, is_out_of_memory
from app.errors import InsufficientStorage, ModelFailure, NotReady
from app.health import HealthMonitor
from app.items import Kind, Row
from app.metrics import Metrics
from app.worker import InferenceWorker
from model.manifest import read_manifest
from model.package import ModelPackage
from tests.app.conftest import Running, form, gather, metric, picture, run, serve, settings_for, until
from tests.app.test_batching import assert_same_prediction, hold_the_device, post


async def queue_in_order(served: Running, texts: list[str]) -> list[asyncio.Task[httpx.Response]]:
    """Send each request once the one before it is queued, so the batch holds them in this order."""
    batcher = served.batcher
    assert batcher is not None
    tasks = []
    for count, text in enumerate(texts, 1):
        tasks.append(asyncio.create_task(post(served, "/predict", picture(), text)))
        await until(lambda count=count: batcher.queued == count)
    return tasks


def test_a_batch_out_of_memory_is_split_and_only_an_item_that_fails_alone_gets_500_out_of_memory(
    probe_package: Path,
) -> None:
    """'%' fits only alone, '&' never fits. The batch [g0, g1, %, g2, &, g3] runs out of memory, and
    so do its halves [g0, g1, %] and [g2, &, g3], then [g1, %] and [&, g3], then [&] alone: six
    out-of-memory passes, 22 rows run in all, and only '&' fails."""
    texts = ["good 0", "good 1", "%fits alone", "good 2", "&never fits", "good 3"]

    async def body() -> None:
        # One call per batch, so the halving below is all the splitting there is.
        async with serve(settings_for(probe_package, call_cost_tokens="off")) as served:
            alone = {text: (await post(served, "/predict", picture(), text)).json() for text in texts if text[0] != "&"}
            before, seen = await served.metrics(), await served.rows_seen()
            slow = await hold_the_device(served)
            responses = await asyncio.gather(*await queue_in_order(served, texts))
            assert (await slow).status_code == 200
            after, rows = await served.metrics(), await served.rows_seen() - seen - 1
            ready = await served.client.get("/readyz")
        for text, response in zip(texts, responses, strict=True):
            if text[0] == "&":
                assert response.status_code == 500, response.text
                assert response.json()["error"]["code"] == "out_of_memory"
            else:
                assert response.status_code == 200, response.text
                assert_same_prediction(response.json(), alone[text])

        def grew(name: str, **labels: str) -> float:
            return metric(after, name, **labels) - metric(before, name, **labels)

        assert grew("fusion_out_of_memory_total", kind="fuse") == 6
        assert grew("fusion_batch_failures_total", kind="fuse") == 1  # the whole batch, not its halves
        assert rows == 22 == grew("fusion_items_executed_total", kind="fuse") - 1
        assert grew("fusion_requests_total", route="/predict", status="500") == 1
        assert ready.status_code == 200  # five of six answered: the model is fine

    run(body())


class _Greedy(nn.Module):
    """An eager model that raises the real torch.cuda.OutOfMemoryError for a batch of more than one."""

    def forward(self, image: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        if image.size(0) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        width = float(tokens.size(1))  # the padded text length it was given
        return {
            "logits": torch.zeros(1, 22),
            "image_embedding": torch.full((1, 16), width),
            "text_embedding": torch.ones(1, 16),
        }

    def encode_image(self, image: Tensor) -> Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    def encode_text(self, tokens: Tensor) -> Tensor:
        raise RuntimeError("shape mismatch")


def test_the_engine_splits_on_torch_cuda_out_of_memory(probe_package: Path) -> None:
    manifest = read_manifest(probe_package)
    package = ModelPackage(probe_package, manifest, _Greedy(), torch.device("cpu"))  # type: ignore[arg-type]
    engine = Engine(package)
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8).numpy()
    tokens = torch.tensor([[5, 5, 0, 0], [5, 5, 5, 5], [5, 0, 0, 0]]).numpy()
    rows = engine.execute(Kind.FUSE, images, tokens)
    # Each item ran alone, its tokens trimmed to its own text length (the stand-in reports it).
    assert [row.image_embedding[0] for row in rows if isinstance(row, Row) and row.image_embedding is not None] == [
        2.0,
        4.0,
        1.0,
    ]
    alone = engine.execute(Kind.IMAGE, images[:1], None)
    assert len(alone) == 1 and isinstance(alone[0], InsufficientStorage)
    failed = engine.execute(Kind.TEXT, None, tokens[:1])
    assert len(failed) == 1 and type(failed[0]) is ModelFailure  # not out of memory: model_failure, not out_of_memory


def test_out_of_memory_is_recognized_by_type_or_message() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: not enough memory: out of memory"))
    with pytest.raises(RuntimeError) as cpu:  # the CPU allocator's own words: a petabyte cannot be had
        torch.empty(2**50, dtype=torch.uint8)
    assert is_out_of_memory(cpu.value) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an error torch raises


def test_a_cuda_error_other_than_out_of_memory_is_a_device_lost_for_good() -> None:
    assert is_device_lost(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert is_device_lost(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_device_lost(RuntimeError("CUDA error: out of memory"))  # split and retried: out_of_memory at worst
    assert not is_device_lost(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_device_lost(RuntimeError("probe: the model is broken"))


def test_a_hung_forward_pass_fails_its_batch_and_turns_liveness_red(probe_package: Path) -> None:
    """'@' keeps the device for about two seconds; the watchdog allows 0.3. The hung request gets
    500 while the pass still runs, the one queued behind it 503 (try another replica), /healthz
    503 so the orchestrator restarts the replica; when the pass ends after all, alive again."""

    async def body() -> None:
        async with serve(settings_for(probe_package, forward_timeout_s=0.3, retry_after_s=1)) as served:
            worker, batcher = served.state.worker, served.batcher
            assert worker is not None and batcher is not None
            hung = asyncio.create_task(post(served, "/predict", picture(), "@hangs"))
            await until(lambda: batcher.running == 1)
            queued = asyncio.create_task(post(served, "/predict", picture(), "behind it"))
            await until(lambda: batcher.queued == 1)
            decoding = [batcher.admit(60.0, 60.0) for _ in range(2)]  # let in before the watchdog trips
            began = time.monotonic()
            answer = await hung
            assert worker.busy_since is not None, "answered while the forward pass still runs"
            assert answer.status_code == 500 and answer.json()["error"]["code"] == "model_timeout"
            assert time.monotonic() - began < 1.0
            behind = await queued
            assert behind.status_code == 503 and behind.headers["retry-after"] == "1"
            health = await served.client.get("/healthz")
            assert health.status_code == 503
            assert health.json() == {
                "status": "dead",
                "reason": "a forward pass has run for more than forward_timeout_s (0.3 s)",
            }
            assert (await served.client.get("/readyz")).status_code == 503
            refused = await post(served, "/predict", picture(), "while hung")
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
            assert isinstance(batcher.refusal(60.0, 60.0), NotReady)  # before its body is read
            # A request that was still decoding when the watchdog tripped is refused as it reaches
            # the queue, not left to wait for its deadline behind the hung pass. Each gets an error
            # of its own: one object raised again would keep every such request's frames alive.
            raised = []
            for ticket in decoding:
                deadline = asyncio.get_running_loop().time() + 60
                try:
                    late = batcher.run(ticket, Kind.TEXT, None, np.array([104, 105], dtype=np.int64), deadline)
                    with pytest.raises(NotReady) as failed:
                        await asyncio.wait_for(late, 0.1)
                    raised.append(failed.value)
                finally:
                    ticket.release()
            assert raised[0] is not raised[1] and raised[0].message == raised[1].message
            samples = await served.metrics()
            assert metric(samples, "fusion_alive") == 0 and metric(samples, "fusion_forward_timeouts_total") == 1
            await until(lambda: served.state.liveness() is None, timeout_s=30)  # the pass ended after all
            assert (await served.client.get("/healthz")).status_code == 200
            assert (await post(served, "/predict", picture(), "after it")).status_code == 200
            assert metric(await served.metrics(), "fusion_alive") == 1

    run(body())


def test_a_batch_handed_over_behind_a_hung_one_is_failed_as_queued(probe_package: Path) -> None:
    """A batch handed to the inference thread early (lookahead_ms) waits there behind the pass that
    hangs: it never ran, so its request gets 503 like the queue, not the hung batch's 500. When the
    hung pass ends, the batch behind it is skipped (nobody waits for it), and the service answers again."""

    async def body() -> None:
        settings = settings_for(probe_package, forward_timeout_s=0.3, retry_after_s=1, lookahead_ms=1000)
        async with serve(settings) as served:
            batcher = served.batcher
            assert batcher is not None
            assert (await post(served, "/predict", picture(), "timed")).status_code == 200  # a batch of 1 timed
            batches = metric(await served.metrics(), "fusion_batch_size_count", kind="fuse")
            hung = asyncio.create_task(post(served, "/predict", picture(), "@hangs"))
            await until(lambda: batcher.running == 1)
            behind = asyncio.create_task(post(served, "/predict", picture(), "behind it"))
            await until(lambda: batcher.running == 2)  # handed over at once: the window is wider than the batch
            answers = await gather(hung, behind)
            assert [a.status_code for a in answers] == [500, 503]
            assert [a.json()["error"]["code"] for a in answers] == ["model_timeout", "not_ready"]
            await until(lambda: served.state.liveness() is None, timeout_s=30)
            await until(lambda: batcher.idle)
            assert (await post(served, "/predict", picture(), "after it")).status_code == 200
            # The hung batch and the last one ran; the batch behind the hung one was skipped.
            assert metric(await served.metrics(), "fusion_batch_size_count", kind="fuse") == batches + 2
            # The hung pass's 2 s did not enter the estimate that opens the next windows.
            expected = batcher.expected_seconds(Kind.FUSE, 1, len("@hangs"))
            assert expected is not None and expected < 0.1

    run(body())


async def answer_one_by_one(served: Running, texts: list[str]) -> list[int]:
    return [(await post(served, "/predict", picture(), text)).status_code for text in texts]


def test_a_poisoned_input_costs_no_readiness(probe_package: Path) -> None:
    """Three failed batches in a row rerun the golden check; it passes, so the model is fine and
    the inputs were bad: /readyz stays 200."""

    async def body() -> None:
        async with serve(settings_for(probe_package, max_failed_batches=3)) as served:
            monitor = served.state.monitor
            assert monitor is not None
            assert await answer_one_by_one(served, ["!a", "!b", "!c"]) == [500, 500, 500]
            await until(lambda: monitor.failed_batches == 0)  # reset by the passing golden check
            assert (await served.client.get("/readyz")).json() == {"status": "ready"}

    run(body())


def test_a_failing_model_turns_readiness_red_until_a_batch_succeeds(probe_package: Path) -> None:
    """'*' breaks the probe model for good, golden inputs included: after three failed batches the
    golden check fails too and /readyz answers 503; liveness stays green (restarting would not
    help a broken package any more than waiting); the first batch that succeeds reruns the golden
    check at once, and its passing restores readiness."""

    async def body() -> None:
        async with serve(settings_for(probe_package, max_failed_batches=3)) as served:
            monitor = served.state.monitor
            assert monitor is not None
            assert await answer_one_by_one(served, ["*breaks", "fails", "fails too"]) == [500, 500, 500]
            await until(lambda: monitor.failing is not None)
            ready = await served.client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json() == {
                "status": "not_ready",
                "reason": "the model is failing: the last 3 batches and the golden check failed",
            }
            assert (await served.client.get("/healthz")).status_code == 200
            samples = await served.metrics()
            assert metric(samples, "fusion_consecutive_failed_batches") == 3
            assert metric(samples, "fusion_ready") == 0  # as /readyz says
            assert await answer_one_by_one(served, ["+mends"]) == [200]
            await until(lambda: monitor.failing is None)  # the golden check, rerun at once, passes
            assert (await served.client.get("/readyz")).json() == {"status": "ready"}
            samples = await served.metrics()
            assert metric(samples, "fusion_consecutive_failed_batches") == 0 and metric(samples, "fusion_ready") == 1

    run(body())


@contextlib.contextmanager
def golden_monitor(golden_check: Callable[[], None]) -> Iterator[HealthMonitor]:
    """A health monitor on a real inference thread, without the app, whose golden check is
    `golden_check`; three failed batches in a row run it."""
    worker = InferenceWorker(threads=1)
    worker.start()
    try:
        yield HealthMonitor(
            worker=worker,
            metrics=Metrics(8),
            forward_timeout_s=30.0,
            max_failed_batches=3,
            golden_check=golden_check,
            retry_after_s=1,
        )
    finally:
        worker.shutdown()


def test_a_batch_that_succeeds_while_the_golden_check_fails_does_not_make_the_replica_ready() -> None:
    """A model broken for one method still answers the others' batches: such a success reruns the
    golden check, which keeps readiness red while it fails, rather than turning it green until the
    next three failures (and red, and green again)."""
    broken = True

    def golden_check() -> None:
        if broken:
            raise RuntimeError("the forward pass is broken")

    async def body(monitor: HealthMonitor) -> None:
        nonlocal broken
        for _ in range(3):
            monitor.batch_done(False)
        await until(lambda: monitor.failing is not None and not monitor._checking)
        monitor.batch_done(True)  # another method's batch
        await until(lambda: not monitor._checking)
        assert monitor.readiness() == "the model is failing: the last 3 batches and the golden check failed"
        assert monitor.liveness() is None  # a broken model: a restart would not mend it
        broken = False
        monitor.batch_done(True)
        await until(lambda: monitor.readiness() is None)
        await monitor.stop()

    with golden_monitor(golden_check) as monitor:
        run(body(monitor))


def test_a_golden_check_failing_with_a_device_error_turns_liveness_red_for_good() -> None:
    """A CUDA error leaves the process's context unusable: a restart mends it, so liveness asks for
    one, and it stays red though a batch of another method succeeds afterwards."""

    def golden_check() -> None:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    async def body(monitor: HealthMonitor) -> None:
        for _ in range(3):
            monitor.batch_done(False)
        await until(lambda: monitor.liveness() is not None)
        assert monitor.liveness() == "the device failed (a CUDA error): only a new process can use it again"
        monitor.batch_done(True)
        await until(lambda: not monitor._checking)
        assert monitor.liveness() == "the device failed (a CUDA error): only a new process can use it again"
        assert monitor.readiness() is not None
        await monitor.stop()

    with golden_monitor(golden_check) as monitor:
        run(body(monitor))


def test_non_finite_and_misshapen_outputs_are_json_errors(probe_package: Path) -> None:
    async def body() -> None:
        async with serve(settings_for(probe_package)) as served:
            for text in ("~nan", "^shape"):
                for path in ("/predict", "/embed"):
                    response = await served.client.post(path, **form(picture(), text))
                    assert response.status_code == 500
                    assert response.json()["error"]["code"] == "model_failure"
                    assert response.headers["content-type"] == "application/json"

    run(body())
