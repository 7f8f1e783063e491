"""Model packages: a folder with a TorchScript archive, a manifest and golden inputs.

    weights/NAME/
      manifest.json   name, version, task, labels, image size, tokenizer, sha256, metrics, golden cases
      model.pt        TorchScript: forward(image, tokens), encode_image(image), encode_text(tokens)
      golden/N.png    golden images; their texts and expected outputs are in the manifest

Loading checks everything before a server may call itself ready: the manifest's fields, the
archive's sha256, the three methods, and that the golden inputs, run through the *shared
preprocessing* and the model, still give the outputs the package was shipped with. Every refusal
is a PackageError whose message names the file and the problem.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from model import torchscript
from model.manifest import MANIFEST_NAME, Manifest, PackageError, read_manifest
from model.preprocess import decode_image, pad_tokens, tokenize

ARCHIVE_NAME: Final = "model.pt"
GOLDEN_DIR: Final = "golden"
REQUIRED_METHODS: Final = ("forward", "encode_image", "encode_text")
# Golden outputs are checked to this absolute tolerance: loose enough for another CPU's kernels or
# a GPU's, tight enough that any change of weights or preprocessing shows.
GOLDEN_ATOL: Final = 2e-3


@dataclass
class ModelPackage:
    path: Path
    manifest: Manifest
    module: torch.jit.ScriptModule
    device: torch.device


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_package(
    package_dir: Path | str, device: torch.device | str = "cpu", *, check_golden: bool = True
) -> ModelPackage:
    """Load and verify a model package onto `device`; raise PackageError on any mismatch.

    On CUDA this also makes float32 mean IEEE float32 for the process (`use_ieee_float32`): the
    golden outputs, and every answer at fp32, are checked against the CPU's."""
    package_dir = Path(package_dir)
    manifest = read_manifest(package_dir)
    archive = package_dir / manifest.archive
    if not archive.is_file():
        raise PackageError(f"{archive}: archive not found")
    if archive.stat().st_size == 0:
        raise PackageError(f"{archive}: archive is empty")
    actual = sha256_file(archive)
    if actual != manifest.archive_sha256:
        raise PackageError(
            f"{archive}: sha256 {actual} does not match the manifest's {manifest.archive_sha256} "
            "(corrupt, truncated or swapped archive)"
        )
    target = torch.device(device)
    use_ieee_float32(target)
    try:
        module = torchscript.load(archive, map_location=target)
    except Exception as exc:  # torch raises RuntimeError, ValueError or its own types for a bad zip
        raise PackageError(f"{archive}: not a loadable TorchScript archive: {type(exc).__name__}") from exc
    module.eval()
    missing = [name for name in REQUIRED_METHODS if not hasattr(module, name)]
    if missing:
        raise PackageError(f"{archive}: missing method(s) {', '.join(missing)} required by the serving contract")
    package = ModelPackage(path=package_dir, manifest=manifest, module=module, device=target)
    if check_golden:
        verify_golden(package)
    return package


def use_ieee_float32(device: torch.device) -> None:
    """On CUDA, no TF32 in float32 convolutions, RNNs or matrix products (process-wide flags).

    cuDNN runs float32 convolutions in TF32 by default on Ampere and later GPUs: a 10-bit mantissa.
    With its convolutions' inputs and weights rounded so (emulated on the CPU), the shipped model's
    logits, about 100 in size, moved by 6.4e-3: three times the golden tolerance, so a GPU would
    refuse to serve it at startup. Speed at lower precision is what `--precision bf16|fp16` is for;
    fp32 means float32. torch 2.9 and later take the per-backend setting, and refuse a mix of it and
    the older flags."""
    if device.type != "cuda":
        return
    backends = torch.backends
    settings: list[Any] = [
        getattr(backends.cudnn, "conv", None),
        getattr(backends.cudnn, "rnn", None),
        backends.cuda.matmul,
    ]
    if all(hasattr(setting, "fp32_precision") for setting in settings):
        for setting in settings:
            setting.fp32_precision = "ieee"
    else:
        backends.cudnn.allow_tf32 = False
        backends.cuda.matmul.allow_tf32 = False


@torch.inference_mode()
def verify_golden(package: ModelPackage) -> None:
    """Run each golden case through the shared preprocessing and the model; compare to the manifest."""
    manifest = package.manifest
    if not manifest.golden:
        raise PackageError(f"{package.path / MANIFEST_NAME}: no golden cases to verify the model with")
    images, tokens = golden_inputs(package.path, manifest)
    images, tokens = images.to(package.device), tokens.to(package.device)
    outputs = run_forward(package.module, images, tokens)
    image_only = package.module.encode_image(images)
    text_only = package.module.encode_text(tokens)
    for index, case in enumerate(manifest.golden):
        where = f"{package.path / MANIFEST_NAME}: golden case {index} ({case.image!r}, {case.text!r})"
        checks = {
            "logits": (outputs["logits"][index], case.logits),
            "image_embedding": (outputs["image_embedding"][index], case.image_embedding),
            "text_embedding": (outputs["text_embedding"][index], case.text_embedding),
            "encode_image": (image_only[index], case.image_embedding),
            "encode_text": (text_only[index], case.text_embedding),
        }
        for name, (actual, expected) in checks.items():
            error = _max_abs_error(actual, expected)
            if not error <= GOLDEN_ATOL:  # also catches NaN
                raise PackageError(f"{where}: {name} differs from the shipped output by {error:.3g} > {GOLDEN_ATOL}")
        label = manifest.labels[int(outputs["logits"][index].argmax())]
        if label != case.label:
            raise PackageError(f"{where}: predicted {label!r}, the package was shipped predicting {case.label!r}")


def golden_inputs(package_dir: Path, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    cases = [(case.image, case.text) for case in manifest.golden]
    return preprocess_golden(package_dir, cases, manifest.image_size, manifest.max_text_length)


def preprocess_golden(
    package_dir: Path, cases: Sequence[tuple[str, str]], image_size: tuple[int, int], max_text_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image path relative to the package, text) pairs through the shared preprocessing: [B,3,H,W], [B,L]."""
    images = []
    texts = []
    for image, text in cases:
        path = package_dir / image
        if not path.is_file():
            raise PackageError(f"{path}: golden image not found")
        images.append(decode_image(path.read_bytes(), image_size))
        texts.append(tokenize(text, max_text_length).ids)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(pad_tokens(texts))


def run_forward(
    module: torch.jit.ScriptModule | torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
) -> dict[str, torch.Tensor]:
    outputs = module(images, tokens)
    if not isinstance(outputs, dict) or not {"logits", "image_embedding", "text_embedding"} <= outputs.keys():
        raise PackageError("forward must return a dict with logits, image_embedding and text_embedding")
    return {name: outputs[name].float().cpu() for name in ("logits", "image_embedding", "text_embedding")}


def _max_abs_error(actual: torch.Tensor, expected: tuple[float, ...]) -> float:
    reference = torch.tensor(expected, dtype=torch.float32)
    if actual.shape != reference.shape:
        return math.inf
    return float((actual.float().cpu() - reference).abs().max())
