"""Wrap any TorchScript archive that follows the serving contract into a model package.

    python -m model.wrap ARCHIVE.pt --out DIR --name N --version V --labels a,b,c \\
        --image-size H,W --max-text-length L [--task T] [--metrics metrics.json]

The contract (DESIGN.md): `forward(image uint8 [B,3,H,W], tokens int64 [B,L])` returns a dict with
`logits [B,C]`, `image_embedding [B,D]` and `text_embedding [B,D]`; `encode_image(image)` and
`encode_text(tokens)` return `[B,D]`, L2-normalized. The manifest's fields come from the command
line, except the embedding dimension, which is read off the model's outputs.

Before anything is written the archive is probed with the package's own golden inputs (drawn
pictures with English and Chinese questions, through the shared preprocessing): every method must
exist, return the contract's shapes at batch 1 and 4 and at text lengths 1 and the maximum, give
finite, unit-norm embeddings, and `encode_image`/`encode_text` must agree with what `forward`
returns (the loader checks both against the same golden outputs). A refusal names the problem.
The archive is copied byte for byte (its sha256 is the user's own file's), the golden outputs are
computed from the copy, and the finished package is loaded once with its golden check, as a
server will.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from model import torchscript
from model.export import PackageInfo, record_golden, stage_golden, synthetic_golden_inputs, write_atomically
from model.manifest import Manifest, PackageError
from model.package import ARCHIVE_NAME, GOLDEN_ATOL, REQUIRED_METHODS, load_package
from model.preprocess import TokenIds, decode_image, pad_tokens, tokenize

OUTPUT_KEYS: Final = ("logits", "image_embedding", "text_embedding")
# Unit norm to this tolerance: float32 normalization is exact to ~1e-6; anything looser means the
# model does not normalize at all.
NORM_TOLERANCE: Final = 1e-3


def wrap_archive(
    archive: Path | str,
    out_dir: Path | str,
    *,
    name: str,
    version: str,
    labels: Sequence[str],
    image_size: tuple[int, int],
    max_text_length: int,
    task: str = "classification",
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    """Check the archive against the serving contract, then write a verified package to out_dir."""
    archive = Path(archive)
    if not archive.is_file() or archive.stat().st_size == 0:
        raise PackageError(f"{archive}: no such archive, or it is empty")
    if len(labels) < 1 or len(set(labels)) != len(labels):
        raise PackageError(f"labels must be distinct and at least one: {list(labels)}")
    module = _load(archive)
    golden = synthetic_golden_inputs()
    images = torch.from_numpy(np.stack([decode_image(case.image, image_size) for case in golden]))
    texts = [tokenize(case.text, max_text_length).ids for case in golden]
    try:
        embedding_dim = probe_contract(module, images, texts, num_labels=len(labels), max_text_length=max_text_length)
    except PackageError as exc:
        raise PackageError(f"{archive}: {exc}") from exc
    info = PackageInfo(
        name=name,
        version=version,
        task=task,
        labels=tuple(labels),
        image_size=image_size,
        max_text_length=max_text_length,
        embedding_dim=embedding_dim,
        metrics=dict(metrics or {}),
        model_config={},  # the architecture is the user's: the archive is all there is
    )

    def write(staging: Path) -> Manifest:
        cases, golden_images, golden_tokens = stage_golden(info, golden, staging)
        shutil.copyfile(archive, staging / ARCHIVE_NAME)
        copy = _load(staging / ARCHIVE_NAME)
        return record_golden(info, cases, copy, golden_images, golden_tokens, staging)

    manifest = write_atomically(out_dir, write)
    load_package(out_dir)  # the loader's own checks, golden outputs included: what a server will run
    return manifest


def _load(archive: Path) -> torch.jit.ScriptModule:
    try:
        module = torchscript.load(archive)
    except Exception as exc:  # torch raises RuntimeError, ValueError or its own types for a bad zip
        raise PackageError(f"{archive}: not a loadable TorchScript archive ({type(exc).__name__})") from exc
    missing = [method for method in REQUIRED_METHODS if not hasattr(module, method)]
    if missing:
        raise PackageError(
            f"{archive}: missing method(s) {', '.join(missing)}; the serving contract needs "
            f"{', '.join(REQUIRED_METHODS)} (the README, 'Model packages')"
        )
    return module.eval()


@torch.inference_mode()
def probe_contract(
    module: torch.jit.ScriptModule,
    images: torch.Tensor,
    texts: Sequence[TokenIds],
    *,
    num_labels: int,
    max_text_length: int,
) -> int:
    """Run every method on real inputs and check the contract's shapes; return the embedding dim."""
    tokens = torch.from_numpy(pad_tokens(texts))
    batch = len(images)
    outputs = _call(module.forward, "forward", images, tokens)
    if not isinstance(outputs, dict) or not set(OUTPUT_KEYS) <= set(outputs):
        got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise PackageError(f"forward must return a dict with keys {', '.join(OUTPUT_KEYS)}; it returned {got}")
    logits = _matrix(outputs["logits"], "forward()['logits']", batch)
    if logits.shape[1] != num_labels:
        raise PackageError(f"forward()['logits'] has {logits.shape[1]} columns but {num_labels} labels were given")
    image_embedding = _matrix(outputs["image_embedding"], "forward()['image_embedding']", batch)
    dim = image_embedding.shape[1]
    text_embedding = _matrix(outputs["text_embedding"], "forward()['text_embedding']", batch, dim)
    encoded_image = _matrix(_call(module.encode_image, "encode_image", images), "encode_image", batch, dim)
    encoded_text = _matrix(_call(module.encode_text, "encode_text", tokens), "encode_text", batch, dim)
    for label, value in (
        ("forward()['image_embedding']", image_embedding),
        ("forward()['text_embedding']", text_embedding),
        ("encode_image", encoded_image),
        ("encode_text", encoded_text),
    ):
        worst = float((value.norm(dim=1) - 1).abs().max())
        if not worst <= NORM_TOLERANCE:
            raise PackageError(f"{label} is not L2-normalized (a norm is off by {worst:.3g})")
    for label, separate, joint in (
        ("encode_image", encoded_image, image_embedding),
        ("encode_text", encoded_text, text_embedding),
    ):
        error = float((separate - joint).abs().max())
        if not error <= GOLDEN_ATOL:
            raise PackageError(f"{label} differs from forward's embedding by {error:.3g} > {GOLDEN_ATOL}")
    # The batcher runs any batch size and pads texts to the longest in the batch: one item, at the
    # shortest and the longest lengths, must work too.
    for length in (1, max_text_length):
        one = torch.full((1, length), ord("a") + 1, dtype=torch.int64)
        result = _call(module.forward, f"forward (batch 1, text length {length})", images[:1], one)
        if not isinstance(result, dict) or tuple(result["logits"].shape) != (1, num_labels):
            raise PackageError(f"forward at batch 1 and text length {length} does not return logits [1, {num_labels}]")
    return int(dim)


def _call(method: Any, label: str, *inputs: torch.Tensor) -> Any:
    shapes = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in inputs)
    try:
        return method(*inputs)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[-1][:300] if lines else type(exc).__name__
        raise PackageError(f"{label} failed on inputs {shapes}: {reason}") from exc


def _matrix(value: Any, label: str, rows: int, columns: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != rows:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise PackageError(f"{label} must be a [{rows}, N] tensor; it is {shape}")
    if columns is not None and value.shape[1] != columns:
        raise PackageError(f"{label} has width {value.shape[1]}, but the embedding dimension is {columns}")
    if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
        raise PackageError(f"{label} must be finite floating-point values")
    return value.float()


def _pair(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected H,W (two integers), got {text!r}") from exc
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError("H and W must be positive")
    return height, width


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.wrap", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("archive", type=Path, help="a TorchScript archive (torch.jit.save) following the contract")
    parser.add_argument("--out", type=Path, required=True, help="package folder to write (replaced atomically)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--labels", required=True, help="comma-separated, in logit order")
    parser.add_argument("--image-size", type=_pair, required=True, help="H,W the preprocessing resizes images to")
    parser.add_argument("--max-text-length", type=int, required=True, help="most token ids (UTF-8 bytes) per text")
    parser.add_argument("--task", default="classification")
    parser.add_argument("--metrics", type=Path, help="a JSON object of evaluation metrics to record")
    args = parser.parse_args(argv)
    if args.max_text_length < 1:
        parser.error("--max-text-length must be positive")
    labels = [label.strip() for label in args.labels.split(",")]
    try:
        metrics = json.loads(args.metrics.read_text(encoding="utf-8")) if args.metrics else {}
        if not isinstance(metrics, dict):
            raise PackageError(f"{args.metrics}: metrics must be a JSON object")
        manifest = wrap_archive(
            args.archive,
            args.out,
            name=args.name,
            version=args.version,
            labels=labels,
            image_size=args.image_size,
            max_text_length=args.max_text_length,
            task=args.task,
            metrics=metrics,
        )
    except (PackageError, OSError, json.JSONDecodeError) as exc:
        sys.stderr.write(f"model.wrap: refused: {exc}\n")
        return 1
    sys.stdout.write(
        f"wrote {args.out}: {manifest.name} {manifest.version}, {len(manifest.labels)} labels, "
        f"embedding dim {manifest.embedding_dim}, {len(manifest.golden)} golden cases, "
        f"sha256 {manifest.archive_sha256}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
