"""Engine: the loaded TorchScript module on its device, and the only code that calls it.

Every method here runs on the inference thread (`app.worker`). Inputs arrive as numpy views of
the batcher's staging buffers (pinned host memory on CUDA); outputs leave as numpy arrays, one row
per input, in input order, so a result can never reach the wrong request.

Which method a batch runs (the serving contract, DESIGN.md):

    Kind.FUSE   forward(image, tokens) -> logits, image_embedding, text_embedding
                (/predict, and /embed with both inputs: they share batches)
    Kind.IMAGE  encode_image(image)    -> image_embedding   (/embed, image only)
    Kind.TEXT   encode_text(tokens)    -> text_embedding    (/embed, text only)

On the CPU at fp32 the module that serves is a frozen copy optimized for inference, checked against
the module as loaded at startup (app.graph_optimization; --no-optimize-graph: as loaded), and again
at every shape the warm-up runs: a copy that differs there is dropped before the service is ready.

With a reduced precision (bf16, or fp16 on CUDA) every call runs under autocast; outputs leave as
float32 all the same. At startup the package's golden check runs at full precision first (it checks
the archive), then the same cases through the serving path must give the same answers, and
embeddings within REDUCED_PRECISION_ATOL: a precision that changes a shipped answer is refused.

A batch that raises (or returns the wrong shapes, or runs out of device memory) is split in halves
and each half retried, down to single items, so one bad item fails alone (500, with the code
`out_of_memory` when it runs out of memory even alone); a row with a non-finite output fails alone
too, and never reaches JSON.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from prometheus_client import Counter

from app import graph_optimization
from app.config import Precision
from app.errors import InsufficientStorage, ModelFailure
from app.items import ByteArray, FloatArray, Kind, Row, RowResult, TokenArray
from app.metrics import Metrics
from app.text_groups import Timing, fit_call_cost, group_by_length
from model.manifest import Manifest
from model.package import GOLDEN_ATOL, ModelPackage, golden_inputs, load_package, verify_golden

log = logging.getLogger(__name__)


_AUTOCAST_DTYPES: Final[dict[str, torch.dtype]] = {"bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 keeps 8 bits of mantissa: unit-norm embeddings of this size moved by up to ~2e-3 on the
# shipped model (fp32 golden tolerance: GOLDEN_ATOL); ten times that still catches a broken path.
REDUCED_PRECISION_ATOL: Final = 2e-2


@dataclass(frozen=True, slots=True)
class _Methods:
    """The three methods of the serving contract, looked up once on one module."""

    forward: Any
    encode_image: Any
    encode_text: Any

    @classmethod
    def of(cls, module: torch.jit.ScriptModule) -> _Methods:
        return cls(module.forward, module.encode_image, module.encode_text)


@dataclass(frozen=True, slots=True)
class WarmUp:
    kind: Kind
    size: int
    length: int


@dataclass(frozen=True, slots=True)
class _KindCounters:
    """One kind's engine counters (app.metrics), their label already applied."""

    items: Counter
    calls: Counter
    failures: Counter
    tokens: Counter
    padding: Counter

    @classmethod
    def of(cls, metrics: Metrics, kind: Kind) -> _KindCounters:
        label = kind.value
        return cls(
            items=metrics.items_executed.labels(label),
            calls=metrics.batch_calls.labels(label),
            failures=metrics.batch_failures.labels(label),
            tokens=metrics.tokens.labels(label),
            padding=metrics.padding.labels(label),
        )

    def count_tokens(self, lengths: Sequence[int]) -> None:
        """Token slots of one call (rows x its longest text) and how many of them are padding."""
        if lengths:
            slots = len(lengths) * max(max(lengths), 1)
            self.tokens.inc(slots)
            self.padding.inc(slots - sum(lengths))


class DeviceUnavailable(Exception):
    """The requested device does not exist on this machine."""


class OutputContractError(Exception):
    """The model returned something other than the serving contract's outputs."""


class PrecisionUnsupported(Exception):
    """The requested precision cannot run on this device."""


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, Python's MemoryError, or an error whose own message says so: a
    RuntimeError from another allocator (the CPU's says "can't allocate memory"), or torch.jit.Error,
    which is what an exception raised by scripted code becomes. Whether the CUDA allocator's error
    keeps its type through a scripted call has not been seen on a GPU here: its message ("CUDA out
    of memory") is caught either way."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    message = _own_message(exc)
    return message is not None and any(words in message.lower() for words in _OUT_OF_MEMORY_WORDS)


def is_device_lost(exc: BaseException) -> bool:
    """A device error other than running out of memory (an illegal memory access, a device-side
    assert): it leaves the process's CUDA context unusable for good, and only a new process
    serves again. torch.AcceleratorError, or "CUDA error" in the error's own message."""
    if is_out_of_memory(exc):
        return False
    if isinstance(exc, torch.AcceleratorError):
        return True
    message = _own_message(exc)
    return message is not None and "CUDA error" in message


def _own_message(exc: BaseException) -> str | None:
    """What a RuntimeError or torch.jit.Error says itself; None for other exceptions, which torch
    does not raise."""
    if isinstance(exc, torch.jit.Error):
        # Its message quotes the scripted source around the failing line (which may well mention
        # memory, or CUDA); the error itself is the last line.
        return str(exc).rstrip().rpartition("\n")[2]
    if isinstance(exc, RuntimeError):
        return str(exc)
    return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {name!r} was requested but this machine has no usable CUDA device")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {name!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def check_precision(device: torch.device, precision: Precision) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise PrecisionUnsupported("--precision fp16 needs a CUDA device; on the CPU use bf16 (or fp32)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise PrecisionUnsupported(f"{torch.cuda.get_device_name(device)} has no native bf16; use fp16 (or fp32)")


_MODEL_FAILED: Final = "the model failed on this input"
_OUT_OF_MEMORY: Final = "the model ran out of device memory on this input, even alone"
# How allocators say so: CUDA's and the caching allocators' "out of memory", the CPU's "can't allocate memory".
_OUT_OF_MEMORY_WORDS: Final = ("out of memory", "can't allocate memory", "not enough memory")
_NOT_FINITE: Final = "the model produced a non-finite output for this input"


def softmax(logits: FloatArray) -> FloatArray:
    """Row-wise softmax in float32, shifted by each row's largest logit so that exp() cannot overflow.
    A row with a non-finite logit comes out non-finite (and fails alone), without a numpy warning."""
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def _host_float32(value: torch.Tensor) -> FloatArray:
    if value.device.type == "cpu" and value.dtype == torch.float32:
        return value.numpy()
    return value.to("cpu", torch.float32).numpy()


def warm_up_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes a CPU warms up: 1, the powers of two below the largest, and the largest.

    On a CPU the first call at a batch size not warmed cost about what the same call costs repeated
    (`python -m bench.startup_profile`, README), while warming every size took 1.9 s of a 5 s start
    against 0.7 s. An accelerator warms every size: kernels are chosen per shape there."""
    return sorted({1, max_batch_size, *(2**k for k in range(1, max_batch_size.bit_length()) if 2**k < max_batch_size)})


class Engine:
    def __init__(
        self,
        package: ModelPackage,
        metrics: Metrics | None = None,
        precision: Precision = "fp32",
        optimize_graph: bool = True,
    ) -> None:
        check_precision(package.device, precision)
        self.package = package
        self.precision = precision
        self._autocast_dtype = _AUTOCAST_DTYPES.get(precision)
        self.metrics = metrics
        self.manifest: Manifest = package.manifest
        self.device = package.device
        self.num_labels = len(package.manifest.labels)
        self.dim = package.manifest.embedding_dim
        # What serves: the module as loaded, or its frozen, optimized copy (app.graph_optimization).
        optimize = optimize_graph and graph_optimization.applies(package.device, precision)
        optimized = graph_optimization.optimized_module(package) if optimize else None
        self.graph_optimized = optimized is not None
        self._loaded = _Methods.of(package.module)
        self._methods = _Methods.of(optimized) if optimized is not None else self._loaded
        # One more forward call's cost in padded text tokens, per kind (infinite: batches never
        # split); measured by `measure_call_cost` at startup, or set from the settings.
        self.call_cost_tokens: dict[Kind, float] = dict.fromkeys(Kind, math.inf)
        # Each kind's counters, looked up once: `labels()` takes a lock and a dict lookup per call,
        # a cost every batch-1 request would pay several times over.
        self._counters = {kind: _KindCounters.of(metrics, kind) for kind in Kind} if metrics is not None else None

    @classmethod
    def load(
        cls,
        path: Path,
        device: torch.device,
        metrics: Metrics | None = None,
        precision: Precision = "fp32",
        optimize_graph: bool = True,
    ) -> Engine:
        """Load and verify the package files (sha256, methods); the golden check runs later, after warm-up."""
        return cls(load_package(path, device, check_golden=False), metrics, precision, optimize_graph)

    # -- serving ---------------------------------------------------------------------------------

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> npt.NDArray[Any]:
        """A staging buffer for the batcher: pinned on CUDA so host-to-device copies run asynchronously."""
        pin = self.device.type == "cuda"
        return torch.zeros(shape, dtype=dtype, pin_memory=pin).numpy()  # the array keeps the tensor alive

    def execute(self, kind: Kind, images: ByteArray | None, tokens: TokenArray | None) -> list[RowResult]:
        """Run one batch: images uint8 [B,3,H,W] and/or tokens int64 [B,L]; one result per item, in order.

        A batch of texts of mixed lengths runs as a few calls of similar lengths, when that saves
        more padded tokens than the calls cost (`app.text_groups`, `call_cost_tokens`)."""
        count = len(images) if images is not None else len(tokens) if tokens is not None else 0
        lengths: list[int] = np.count_nonzero(tokens, axis=1).tolist() if tokens is not None else []
        groups = group_by_length(lengths, self.call_cost_tokens[kind]) if lengths else [list(range(count))]
        counters = self._counters[kind] if self._counters is not None else None
        # A whole batch runs as a range: the staging buffer's view, no copy.
        runs: list[Sequence[int]] = [range(count)] if len(groups) == 1 else list(groups)
        results: list[RowResult] = [ModelFailure(_MODEL_FAILED)] * count  # every row is set below
        with torch.inference_mode():
            for rows in runs:
                if counters is not None:
                    counters.count_tokens([lengths[row] for row in rows] if lengths else [])
                for row, result in zip(rows, self._run_rows(kind, images, tokens, rows, whole=True), strict=True):
                    results[row] = result
        if counters is not None:
            counters.calls.inc(len(runs))
        if self.device.type == "cuda":
            # The staging buffer goes back to the batcher on return, to be refilled. A call that
            # answered copied its outputs back, which waited for its inputs' copies; a call that
            # failed did not, and its pinned inputs may still be copying.
            torch.cuda.current_stream(self.device).synchronize()
        return results

    def _run_rows(
        self,
        kind: Kind,
        images: ByteArray | None,
        tokens: TokenArray | None,
        rows: Sequence[int],
        *,
        whole: bool = False,
    ) -> list[RowResult]:
        """The given rows of a batch (a range, or a group's rows). When they fail together, each half
        is retried on its own (down to single items), so one bad item fails alone, and a batch too
        large for the device's memory runs in smaller pieces; only an item that fails alone gets an
        error."""
        count = len(rows)
        if self._counters is not None:
            self._counters[kind].items.inc(count)
        try:
            return self._rows(self._call(kind, *self._slice(images, tokens, rows), count), count)
        except Exception as exc:
            failure = self._failure(exc, kind, count)
        if self.device.type == "cuda" and isinstance(failure, InsufficientStorage):
            torch.cuda.empty_cache()  # outside `except`: the traceback held the failed pass's tensors
        if count == 1:
            return [failure]
        if whole and self._counters is not None:
            self._counters[kind].failures.inc()
        half = count // 2
        return self._run_rows(kind, images, tokens, rows[:half]) + self._run_rows(kind, images, tokens, rows[half:])

    @staticmethod
    def _slice(
        images: ByteArray | None, tokens: TokenArray | None, rows: Sequence[int]
    ) -> tuple[ByteArray | None, TokenArray | None]:
        """The rows' images [n,3,H,W] and tokens [n,L'], L' the longest text among them (ids are
        >= 1 and padding is 0, so a row's nonzero count is its length). A range of rows is a view of
        the staging buffer; a group's scattered rows are a copy (on CUDA, an unpinned one: its copy
        to the device does not overlap, a cost the saved padding outweighs)."""
        if isinstance(rows, range):
            total = len(images) if images is not None else len(tokens) if tokens is not None else 0
            if rows == range(total):  # the whole batch: the batcher's view, its texts already cut to the longest
                return images, tokens
            images = images[rows.start : rows.stop] if images is not None else None
            tokens = tokens[rows.start : rows.stop] if tokens is not None else None
        else:
            index = np.asarray(rows, dtype=np.intp)
            images = images[index] if images is not None else None
            tokens = tokens[index] if tokens is not None else None
        if tokens is not None:
            tokens = tokens[:, : max(int(np.count_nonzero(tokens, axis=1).max()), 1)]
        return images, tokens

    def _failure(self, exc: Exception, kind: Kind, count: int) -> ModelFailure:
        then = "splitting it" if count > 1 else "failing the item"
        if is_out_of_memory(exc):
            log.warning("a %s batch of %d ran out of device memory; %s", kind.value, count, then)
            if self.metrics is not None:
                self.metrics.out_of_memory.labels(kind.value).inc()
            return InsufficientStorage(_OUT_OF_MEMORY)
        # The traceback once, where the failure is pinned to one item; a line for each split.
        log.error("a %s batch of %d failed; %s", kind.value, count, then, exc_info=exc if count == 1 else None)
        return ModelFailure(_MODEL_FAILED)

    def _call(
        self, kind: Kind, images: ByteArray | None, tokens: TokenArray | None, count: int
    ) -> dict[str, torch.Tensor]:
        image, text = self._inputs(kind, images, tokens)
        with self._precision():
            return self._call_model(self._methods, kind, image, text, count)

    def _inputs(
        self, kind: Kind, images: ByteArray | None, tokens: TokenArray | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        image = self._to_device(images) if kind.needs_image else None
        text = self._to_device(np.ascontiguousarray(tokens)) if kind.needs_text else None
        return image, text

    def _precision(self) -> AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _call_model(
        self, methods: _Methods, kind: Kind, image: torch.Tensor | None, text: torch.Tensor | None, count: int
    ) -> dict[str, torch.Tensor]:
        if kind is Kind.FUSE:
            assert image is not None and text is not None
            outputs = methods.forward(image, text)
            if not isinstance(outputs, dict):
                raise OutputContractError(f"forward returned {type(outputs).__name__}, not a dict")
            return {  # softmax on the host copy (`_rows`): one less call that gives up the GIL
                "logits": self._checked(outputs.get("logits"), count, self.num_labels, "logits"),
                "image_embedding": self._checked(outputs.get("image_embedding"), count, self.dim, "image_embedding"),
                "text_embedding": self._checked(outputs.get("text_embedding"), count, self.dim, "text_embedding"),
            }
        if kind is Kind.IMAGE:
            return {"image_embedding": self._checked(methods.encode_image(image), count, self.dim, "encode_image")}
        return {"text_embedding": self._checked(methods.encode_text(text), count, self.dim, "encode_text")}

    def _to_device(self, array: npt.NDArray[np.generic] | None) -> torch.Tensor:
        assert array is not None
        tensor = torch.from_numpy(array)
        return tensor if self.device.type == "cpu" else tensor.to(self.device, non_blocking=True)

    @staticmethod
    def _checked(value: object, count: int, width: int, name: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (count, width):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise OutputContractError(f"{name} has shape {shape}, expected {(count, width)}")
        return value

    @staticmethod
    def _rows(outputs: dict[str, torch.Tensor], count: int) -> list[RowResult]:
        # Finished in numpy on the host copy the answers need anyway. A torch call from Python gives
        # up the GIL and must take it back, which under load means waiting for the event loop or a
        # decoding thread to yield it (up to the switch interval, --switch-interval-ms): on a CPU
        # the forward pass is the one such call a batch cannot avoid. Outputs of an inference-mode
        # call need no detach(), and numpy() on a float32 CPU tensor is a view that keeps the GIL;
        # anything else (a GPU's outputs, a reduced precision) is copied to float32 on the host.
        arrays = {name: _host_float32(value) for name, value in outputs.items()}
        if "logits" in arrays:
            arrays["probs"] = softmax(arrays.pop("logits"))
        finite = np.ones(count, dtype=bool)
        for array in arrays.values():
            finite &= np.isfinite(array).all(axis=1)
        ok = finite.tolist()
        return [
            Row(**{name: array[i] for name, array in arrays.items()}) if ok[i] else ModelFailure(_NOT_FINITE)
            for i in range(count)
        ]

    # -- startup ---------------------------------------------------------------------------------

    def warm_up_plan(
        self, kinds: Iterable[Kind], max_batch_size: int, text_lengths: Sequence[int], *, every_size: bool | None = None
    ) -> list[WarmUp]:
        """Each kind at the batch sizes `warm_up_sizes` gives (`every_size`: all of them, the default
        on an accelerator); all text lengths at the smallest and largest batch, one in between, taken
        in turn by the size's position, so that every length also runs at a middle size. First calls
        pay for graph profiling and optimization, kernel selection and allocator growth; paying them
        here means no request does."""
        if every_size is None:
            every_size = self.device.type != "cpu"
        sizes = range(1, max_batch_size + 1) if every_size else warm_up_sizes(max_batch_size)
        ends = (1, max_batch_size)
        plan = []
        for kind in kinds:
            for position, size in enumerate(sizes):
                lengths = text_lengths if size in ends else [text_lengths[position % len(text_lengths)]]
                plan += [WarmUp(kind, size, length) for length in (lengths if kind.needs_text else lengths[:1])]
        return plan

    def warm_up(self, step: WarmUp) -> None:
        """One warm-up call (the lifespan submits them one by one, so a shutdown can stop between).

        With the optimized graph serving, the module as loaded runs the same inputs and the two
        must agree within GOLDEN_ATOL: oneDNN picks its kernels per shape, so the startup check of
        the rewrite (the golden batch, and each case alone) vouches for those shapes only, and the
        warm-up adds the shapes it runs. On a CPU that is a sample of the shapes requests form (the
        sizes of `warm_up_sizes`, a few text lengths), not all of them: the check vouches for the
        rewrite's kernels at a spread of sizes and lengths, and a shape outside it is trusted by
        likeness. Where they differ, the module as loaded serves from here on (it has just run this
        shape, and runs the rest of the warm-up)."""
        image, text = self._inputs(step.kind, *self._synthetic(step))
        with torch.inference_mode(), self._precision():
            served = self._call_model(self._methods, step.kind, image, text, step.size)
            if self.graph_optimized:
                loaded = self._call_model(self._loaded, step.kind, image, text, step.size)
                self._check_rewrite(step, loaded, served)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a failure in this call surfaces here, not in a later one

    def _check_rewrite(self, step: WarmUp, loaded: dict[str, torch.Tensor], served: dict[str, torch.Tensor]) -> None:
        difference = graph_optimization.output_difference((loaded[name], served[name]) for name in loaded)
        if difference <= GOLDEN_ATOL:
            return
        where = f"batch {step.size}" + (f", texts of {step.length} tokens" if step.kind.needs_text else "")
        log.warning(
            "serving the module as loaded: its optimized graph differs in %s at %s by %.3g (more than %g)",
            step.kind.value,
            where,
            difference,
            GOLDEN_ATOL,
        )
        self._methods = self._loaded
        self.graph_optimized = False

    def _synthetic(self, step: WarmUp) -> tuple[ByteArray, TokenArray]:
        """Random pixels and `step.size` texts of `step.length` lower-case letters (plain text, like
        real questions; ids are UTF-8 bytes + 1), the same for the same shape."""
        height, width = self.manifest.image_size
        generator = torch.Generator().manual_seed(step.size * 1000 + step.length)
        images = torch.randint(0, 256, (step.size, 3, height, width), dtype=torch.uint8, generator=generator)
        tokens = torch.randint(
            ord("a") + 1, ord("z") + 2, (step.size, step.length), dtype=torch.int64, generator=generator
        )
        return images.numpy(), tokens.numpy()

    def _timed_call(self, kind: Kind, images: ByteArray, tokens: TokenArray) -> float:
        """Seconds of one whole call, outputs on the host (on CUDA, after the device finished)."""
        began = time.perf_counter()
        with torch.inference_mode():
            self._call(kind, images, tokens, len(images))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - began

    def measure_call_cost(self, kind: Kind, lengths: Sequence[int], rows: int, repeats: int = 3) -> float:
        """Time calls at 1 and `rows` rows, each at the shortest and the longest of `lengths`, and fit
        one more call's cost in padded tokens (`app.text_groups.fit_call_cost`): the median of
        `repeats` timed calls per shape, after two untimed ones (a shape's first calls pay for
        profiling and optimization, and the warm-up ran some of these shapes at one length only).
        With batches of one row there is nothing to split: infinity, untimed."""
        if rows < 2:
            return math.inf
        timings = []
        for size in sorted({1, rows}):
            for length in sorted({min(lengths), max(lengths)}):
                images, tokens = self._synthetic(WarmUp(kind, size, length))
                seconds = [self._timed_call(kind, images, tokens) for _ in range(2 + repeats)][2:]
                timings.append(Timing(size, length, statistics.median(seconds)))
        return fit_call_cost(timings)

    def self_check(self) -> None:
        """The package's golden check (full precision: it checks the archive), then the same cases
        through the serving path at the serving precision, all three methods: the same labels, and
        every embedding within the tolerance of that precision."""
        verify_golden(self.package)
        images, tokens = golden_inputs(self.package.path, self.manifest)
        count = len(images)
        pixels, ids = images.contiguous().numpy(), tokens.numpy()
        with torch.inference_mode():
            runs = {kind: self._rows(self._call(kind, pixels, ids, count), count) for kind in Kind}
        tolerance = GOLDEN_ATOL if self._autocast_dtype is None else REDUCED_PRECISION_ATOL
        worst = 0.0
        for index, case in enumerate(self.manifest.golden):
            fused, image_only, text_only = runs[Kind.FUSE][index], runs[Kind.IMAGE][index], runs[Kind.TEXT][index]
            if not (isinstance(fused, Row) and isinstance(image_only, Row) and isinstance(text_only, Row)):
                raise OutputContractError(f"golden case {index} failed in the serving path at {self.precision}")
            assert fused.probs is not None
            label = self.manifest.labels[int(np.argmax(fused.probs))]
            shipped_image = np.asarray(case.image_embedding, dtype=np.float32)
            shipped_text = np.asarray(case.text_embedding, dtype=np.float32)
            outputs = {
                "forward image_embedding": (fused.image_embedding, shipped_image),
                "forward text_embedding": (fused.text_embedding, shipped_text),
                "encode_image": (image_only.image_embedding, shipped_image),
                "encode_text": (text_only.text_embedding, shipped_text),
            }
            for name, (served, shipped) in outputs.items():
                assert served is not None
                error = float(np.abs(served - shipped).max())
                if not error <= tolerance:  # also catches NaN
                    raise OutputContractError(
                        f"golden case {index}: {name} in the serving path at {self.precision} differs from the"
                        f" shipped output by {error:.3g} (at most {tolerance:g} allowed)"
                    )
                worst = max(worst, error)
            if label != case.label:
                raise OutputContractError(
                    f"golden case {index}: the serving path at {self.precision} gives {label!r}, the package was"
                    f" shipped with {case.label!r}"
                )
        if self._autocast_dtype is not None:
            log.info("%s against the shipped fp32 outputs: same answers, embeddings within %.3g", self.precision, worst)
