"""One validated settings object: every command-line flag is also a FUSION_* environment variable.

Precedence, highest first: command-line flags, keyword arguments (tests), environment, defaults.
`python -m app --help` lists every setting with its description.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.preprocess import DEFAULT_LIMITS, ImageLimits, largest_decode_bytes

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
Precision = Literal["fp32", "bf16", "fp16"]

MiB = 1 << 20
# --lookahead-ms where cheap requests decode on the event loop under load: measured against 0 with
# them on (scenes, 2 cores, two runs): 1.15x and 1.29x the throughput at concurrency 32, open-loop
# p99 0.58x and 0.88x.
LOOKAHEAD_WITH_INLINE_DECODE_MS = 2.0


def available_cores() -> int:
    """Cores this process may use: its CPU set, capped by a container's CPU quota.

    Under `docker --cpus 2` or a Kubernetes CPU limit the CPU set is still every host core; one
    torch thread per host core inside a 2-CPU quota gets throttled, so the quota caps the count.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU limit in cores from cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`); None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 when unlimited
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FUSION_",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_prog_name="python -m app",
    )

    # Where and what to serve.
    model: Annotated[Path, Field(description="model package folder (manifest.json + model.pt)")] = Path(
        "weights/shapesqa"
    )
    host: Annotated[str, Field(description="address to listen on")] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535, description="port to listen on (0: any free port)")] = 8000
    device: Annotated[
        str,
        Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto (CUDA if present, else CPU), cpu, cuda, cuda:N"),
    ] = "auto"
    precision: Annotated[
        Precision,
        Field(
            description=(
                "forward passes under autocast at this precision: bf16 (CPU or CUDA) or fp16 (CUDA); startup"
                " refuses one that changes a golden answer"
            )
        ),
    ] = "fp32"
    optimize_graph: Annotated[
        bool,
        Field(
            description=(
                "on the CPU at fp32, serve the module frozen and optimized for inference (oneDNN convolutions),"
                " after its outputs on the golden inputs matched the module as loaded"
            )
        ),
    ] = True
    threads: Annotated[
        int | None,
        Field(
            ge=1,
            le=1024,
            description="intra-op threads of the inference thread (default: half the cores on CPU, 1 on CUDA)",
        ),
    ] = None

    switch_interval_ms: Annotated[
        float,
        Field(
            ge=0.01,  # CPython keeps whole microseconds
            le=100,
            description=(
                "the Python interpreter's thread switch interval in this process (and each front-end): how long"
                " a thread waits for the GIL before it makes the holder give it up (Python's default: 5)"
            ),
        ),
    ] = 0.2

    frontends: Annotated[
        int,
        Field(
            ge=1,
            le=256,
            description=(
                "processes that answer HTTP (parse, decode, respond) on the one port, all feeding this"
                " process's one batcher: for a GPU host, whose device outruns one Python process's"
                " HTTP (1: this process alone)"
            ),
        ),
    ] = 1

    # Batching and admission.
    max_batch_size: Annotated[int, Field(ge=1, le=1024, description="largest batch the device runs")] = 32
    max_wait_ms: Annotated[
        float,
        Field(
            ge=0, le=10_000, description="extra wait for a fuller batch when the device is idle (0: dispatch at once)"
        ),
    ] = 0.0
    gather_ms: Annotated[
        float,
        Field(
            ge=0,
            le=1_000,
            description=(
                "when the device frees while admitted requests are still being decoded, wait up to this long"
                " for them to join the batch (0: never; nothing to wait for when idle)"
            ),
        ),
    ] = 0.0  # 1 ms measured no better at c=32 and c=64 on a 2-core CPU (alternating runs, within noise)
    lookahead_ms: Annotated[
        float | None,
        Field(
            ge=0,
            le=1_000,
            description=(
                "hand the next batch to the device this long before the running one is expected to end, so"
                " that it starts the moment the device frees (0: at the end; default: 2 where cheap requests"
                " decode on the event loop under load, else 0)"
            ),
        ),
    ] = None
    call_cost_tokens: Annotated[
        str,
        Field(
            pattern=r"^(auto|off|\d+(\.\d+)?)$",
            description=(
                "one more forward call's cost in padded text tokens: a batch of mixed text lengths runs as"
                " several calls of similar lengths when that saves more padding (auto: measured at startup;"
                " off: a batch is always one call)"
            ),
        ),
    ] = "auto"
    inline_decode_bytes: Annotated[
        int,
        Field(
            ge=0,
            description=(
                "a request alone in the server (none other admitted, queued or running) whose body is at most"
                " this size and whose image has at most --inline-decode-pixels is decoded on the event loop,"
                " saving the decode pool's two thread hand-offs (0: always in the pool)"
            ),
        ),
    ] = 128 * 1024
    inline_decode_pixels: Annotated[
        int,
        Field(ge=0, description="most pixels (by the image's header) of an image decoded on the event loop"),
    ] = 512 * 512  # a 512x512 PNG decodes and resizes in 2-3 ms here; a small body can hold a huge PNG
    inline_decode_under_load: Annotated[
        bool | None,
        Field(
            description=(
                "decode a request within the two --inline-decode limits on the event loop even while others"
                " are in the server, not only when it is alone (default: on where this process runs the model"
                " on the CPU; off on a GPU and in front-end processes, whose decode pools use the cores the"
                " model leaves free)"
            )
        ),
    ] = None
    max_queue: Annotated[
        int,
        Field(ge=1, description="requests admitted but not yet running (decoding + queued); beyond it: 429"),
    ] = 256
    decode_workers: Annotated[
        int | None,
        Field(ge=1, le=256, description="threads that parse, decode and validate requests (default: min(cores, 4))"),
    ] = None
    body_memory_mb: Annotated[
        int,
        Field(
            ge=1,
            description=(
                "MiB the process may hold for request bodies, from their first byte until decoded, each counted"
                " twice (the body, and its parts copied while it is decoded): a body that does not fit is refused"
                " with 429, by its Content-Length before it is read"
            ),
        ),
    ] = 1024
    decode_memory_mb: Annotated[
        int | None,
        Field(
            ge=1,
            description=(
                "MiB the images decoding in the pool may hold at once, by their estimate; an image waits for"
                " its share within its deadline, and one that alone needs more is refused with 413 (default:"
                " what the costliest image --max-image-pixels admits needs: 1343 MiB at 50 megapixels, for a"
                " WebP with transparency)"
            ),
        ),
    ] = None
    decode_nice: Annotated[
        int,
        Field(
            ge=0,
            le=19,
            description=(
                "how much nicer (lower CPU priority, Linux) the decode threads run than the rest of the process:"
                " under load the forward pass gets its core first, and decoding the cycles left (0: the same)"
            ),
        ),
    ] = 10

    # Deadlines.
    request_timeout_ms: Annotated[
        int, Field(ge=1, description="deadline of a request without an X-Request-Timeout-Ms header")
    ] = 10_000
    max_request_timeout_ms: Annotated[
        int, Field(ge=1, description="largest deadline a client may ask for with X-Request-Timeout-Ms")
    ] = 600_000

    # Shutdown.
    drain_delay_s: Annotated[
        float,
        Field(ge=0, description="after SIGTERM: seconds of /readyz 503 while requests are still served"),
    ] = 5.0
    graceful_timeout_s: Annotated[
        float, Field(gt=0, description="after the drain delay: seconds for accepted work to finish")
    ] = 30.0
    exit_when_dead_s: Annotated[
        float,
        Field(
            ge=0,
            description=(
                "once /healthz has answered 503 this long, stop as on SIGTERM and exit 1, for a supervisor that"
                " restarts processes that exit but does not probe (docker compose); 0: never (Kubernetes' liveness"
                " probe restarts the replica)"
            ),
        ),
    ] = 0.0
    startup_timeout_s: Annotated[
        float,
        Field(
            ge=0,
            description=(
                "not ready this long after the server started (loading, warming up, self-checking: a hang in any"
                " of them), fail startup and exit 1, for a supervisor that restarts processes that exit but does"
                " not probe (docker compose); 0: never (Kubernetes' startup probe restarts the replica)"
            ),
        ),
    ] = 0.0

    # Input limits.
    max_body_bytes: Annotated[int, Field(ge=1, description="largest request body; 413 beyond")] = 20 * MiB
    max_image_bytes: Annotated[int, Field(ge=1, description="largest image part; 413 beyond")] = 16 * MiB
    max_text_bytes: Annotated[
        int,
        Field(ge=1, description="largest text part before tokenizing; texts over the model's max length are 422"),
    ] = 64 * 1024
    max_parts: Annotated[int, Field(ge=1, le=1000, description="most multipart parts in one request")] = 8
    max_image_pixels: Annotated[int, Field(ge=1, description="most pixels (from the header, before decoding)")] = (
        DEFAULT_LIMITS.max_pixels
    )
    max_image_side: Annotated[int, Field(ge=1, description="longest image side in pixels")] = DEFAULT_LIMITS.max_side
    max_image_aspect: Annotated[float, Field(ge=1, description="largest long side / short side ratio")] = (
        DEFAULT_LIMITS.max_aspect
    )

    # Slow clients (upload time). The line and headers are guarded by the HTTP protocol itself
    # (app.protocol), the body by the route.
    max_header_bytes: Annotated[
        int,
        Field(ge=1024, le=MiB, description="largest request line + headers, in bytes; 431 and the connection closed"),
    ] = 32 * 1024
    header_timeout_s: Annotated[
        float, Field(gt=0, description="seconds for a request's line and headers to arrive; the connection is closed")
    ] = 10.0
    body_timeout_s: Annotated[
        float, Field(gt=0, description="seconds for a request body to arrive once its headers have; 408 beyond")
    ] = 10.0

    # Model faults.
    forward_timeout_s: Annotated[
        float,
        Field(gt=0, description="a batch still running after this many seconds fails (500) and turns /healthz 503"),
    ] = 30.0
    max_failed_batches: Annotated[
        int,
        Field(
            ge=1,
            description="consecutive batches with no answer before the golden check reruns; /readyz 503 if it fails",
        ),
    ] = 3

    # Access.
    api_keys: Annotated[
        list[SecretStr],
        NoDecode,
        Field(description="API keys (comma-separated); none: no key needed. Prefer --api-keys-file"),
    ] = []
    api_keys_file: Annotated[
        Path | None, Field(description="file of API keys, one a line ('#' starts a comment); adds to --api-keys")
    ] = None
    metrics_require_key: Annotated[
        bool, Field(description="with API keys on, /metrics needs a key too (health checks never do)")
    ] = True
    docs: Annotated[bool, Field(description="serve the interactive docs (/docs, /redoc) and /openapi.json")] = True

    # Operations.
    retry_after_s: Annotated[
        int,
        Field(ge=1, description="Retry-After of 503 answers while not ready, and of 429s for bodies that do not fit"),
    ] = 2
    log_level: Annotated[LogLevel, Field(description="log level")] = "info"
    access_log: Annotated[bool, Field(description="log every request (uvicorn access log)")] = False

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # FUSION_API_KEYS=key1,key2 (keys never contain commas: see app.auth)
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.request_timeout_ms > self.max_request_timeout_ms:
            raise ValueError("request_timeout_ms must not exceed max_request_timeout_ms")
        if self.max_image_bytes > self.max_body_bytes:
            raise ValueError("max_image_bytes must not exceed max_body_bytes")
        if 2 * self.max_body_bytes > self.body_memory_bytes():
            raise ValueError("body_memory_mb must hold one body of max_body_bytes at least (counted twice)")
        return self

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def intra_op_threads(self, on_cuda: bool) -> int:
        if self.threads is not None:
            return self.threads
        if on_cuda:
            return 1  # the host thread only launches kernels
        # Half the cores: the other half parse, decode and answer requests while a batch runs.
        # Measured on 2 cores: 1 thread ran batch 32 at 126 items/s, 2 threads at 90 (the second
        # core is contended), and serving overlaps decoding with the forward pass.
        return max(1, available_cores() // 2)

    def decodes_inline_under_load(self, on_cuda: bool) -> bool:
        if self.inline_decode_under_load is not None:
            return self.inline_decode_under_load
        # On a CPU host the forward passes take the cores, and a decode thread (at a lower priority)
        # gets one only between them: a 0.3 ms decode took 5.4 ms under load, and a request late that
        # way waits a whole batch more. On the loop it is done at once. On a GPU host the pool's
        # threads decode on cores of their own, in parallel, where the one loop would serialize them.
        return not on_cuda

    def lookahead_s(self, on_cuda: bool) -> float:
        if self.lookahead_ms is not None:
            return self.lookahead_ms / 1000
        # A loop decoding a run of requests hears late that a batch ended: the device waited behind
        # those decodes for its next batch (busy 82 % of the time against 97 % at concurrency 32).
        # Handed over early, the next batch does not wait on the loop. Not measured on a GPU yet.
        if on_cuda or not self.decodes_inline_under_load(on_cuda):
            return 0.0
        return LOOKAHEAD_WITH_INLINE_DECODE_MS / 1000

    def decode_threads(self) -> int:
        return self.decode_workers if self.decode_workers is not None else min(available_cores(), 4)

    def body_memory_bytes(self) -> int:
        return self.body_memory_mb * MiB

    def decode_memory_bytes(self) -> int:
        if self.decode_memory_mb is not None:
            return self.decode_memory_mb * MiB
        return largest_decode_bytes(self.max_image_pixels)

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_pixels=self.max_image_pixels, max_side=self.max_image_side, max_aspect=self.max_image_aspect
        )


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment (and defaults); the command line builds its own in __main__."""
    return Settings()
