"""The archive's module, frozen and optimized for inference on the CPU, checked against itself.

`torch.jit.freeze` turns the weights into constants of the graph, folds each batch norm into the
convolution before it and drops what only training needs; `torch.jit.optimize_for_inference`
then runs the convolutions through oneDNN with their weights packed once, not on every call.
On the shipped model, one intra-op thread on 2 cores, median ms per call (as loaded -> optimized):

    forward        batch 1  2.2 -> 1.8    batch 16  20.8 -> 19.1    batch 32  37.7 -> 34.6
    encode_image   batch 1  0.87 -> 0.70  batch 16  10.9 -> 6.9     batch 32  18.0 -> 13.5

These passes rewrite a graph that this project did not write (any package can be served), so the
result must earn its place: the package's golden inputs through both modules, every method of the
serving contract, as one batch and each case alone, must agree within GOLDEN_ATOL. A pass that
raises (freezing refuses some constructs, such as a ModuleDict looked up by a key) or changes an
output leaves the module as loaded, with a warning that says why. The engine checks the rewrite
again at every shape the warm-up runs (`Engine.warm_up`). Only at fp32 on the CPU: under autocast
the rewritten convolutions keep float32, and on CUDA the passes' rewrites have not been measured.

Freezing copies the module and keeps as attributes what its methods change: a tensor changed in
place (a counter buffer) stays shared with the module as loaded, while a plain value a method sets
(an int) lives in the copy only. The package keeps the module as loaded for its golden check.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch

from app.config import Precision
from model import torchscript
from model.manifest import PackageError
from model.package import GOLDEN_ATOL, REQUIRED_METHODS, ModelPackage, golden_inputs, run_forward
from model.preprocess import PAD_ID

log = logging.getLogger(__name__)

_OTHER_METHODS = [name for name in REQUIRED_METHODS if name != "forward"]


def applies(device: torch.device, precision: Precision) -> bool:
    return device.type == "cpu" and precision == "fp32"


def optimized_module(package: ModelPackage) -> torch.jit.ScriptModule | None:
    """The package's module frozen and optimized for inference, or None (logged) when a pass
    fails or the result differs from the module as loaded on the golden inputs."""
    if not package.manifest.golden:
        return None  # nothing to check a rewrite against (and the package's own check refuses it)
    try:
        optimized = torchscript.optimize_for_inference(package.module, _OTHER_METHODS)
        difference = largest_difference(package, optimized)
    except PackageError:
        raise  # a golden image missing or unreadable: the package's fault, said as such
    except Exception as exc:  # torch raises RuntimeError, torch.jit.Error or its own types
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        log.warning("serving the module as loaded: optimizing its graph failed (%s: %s)", type(exc).__name__, reason)
        return None
    if not difference <= GOLDEN_ATOL:
        log.warning(
            "serving the module as loaded: its optimized graph differs on the golden inputs by %.3g (more than %g)",
            difference,
            GOLDEN_ATOL,
        )
        return None
    log.info("serving the graph frozen and optimized for inference (golden inputs within %.2g)", difference)
    return optimized


@torch.inference_mode()
def largest_difference(package: ModelPackage, candidate: torch.jit.ScriptModule) -> float:
    """The largest absolute difference between the package's module and `candidate` over every
    output of every method, on the package's golden inputs: as one batch, and each case alone at
    its own text length. oneDNN picks its kernels per shape, so one shape would vouch for that shape
    only; batch 1 is what every request on an idle server runs."""
    images, tokens = golden_inputs(package.path, package.manifest)
    images, tokens = images.to(package.device), tokens.to(package.device)
    lengths = (tokens != PAD_ID).sum(dim=1).tolist()  # padding is on the right
    shapes = [(images, tokens)]
    shapes += [(images[i : i + 1], tokens[i : i + 1, : max(length, 1)]) for i, length in enumerate(lengths)]
    return max(_difference(package.module, candidate, *shape) for shape in shapes)


def _difference(
    loaded: torch.jit.ScriptModule, rewritten: torch.jit.ScriptModule, images: torch.Tensor, tokens: torch.Tensor
) -> float:
    outputs = run_forward(loaded, images, tokens), run_forward(rewritten, images, tokens)
    pairs = list(zip(outputs[0].values(), outputs[1].values(), strict=True))
    pairs.append((loaded.encode_image(images), rewritten.encode_image(images)))
    pairs.append((loaded.encode_text(tokens), rewritten.encode_text(tokens)))
    return output_difference(pairs)


def output_difference(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The largest absolute difference over (expected, actual) output pairs; infinite where shapes
    differ or a difference is NaN (`max` would keep a NaN only where it came first)."""
    worst = 0.0
    for expected, actual in pairs:
        if expected.shape != actual.shape:
            return math.inf
        difference = float((expected.float() - actual.float()).abs().max())
        if math.isnan(difference):
            return math.inf
        worst = max(worst, difference)
    return worst
