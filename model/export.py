"""Export a model into a package: script on the CPU, prove parity, save, record golden outputs.

Scripting happens on the CPU so the archive carries no device constants (`torch.jit.load`'s
`map_location` then places it anywhere). Parity is checked twice: eager against scripted, and
scripted against the archive reloaded from disk. The golden outputs are computed from the
reloaded archive through the shared preprocessing, exactly as a server will run them.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import torch
from PIL import Image
from torch import nn

from model import torchscript
from model.manifest import MANIFEST_NAME, GoldenCase, Manifest, PackageError
from model.package import ARCHIVE_NAME, GOLDEN_DIR, preprocess_golden, run_forward, sha256_file
from model.preprocess import TOKENIZER

PARITY_ATOL: Final = 1e-4


@dataclass(frozen=True)
class GoldenInput:
    image: bytes  # encoded image (any allowed format); saved into the package as PNG
    text: str


@dataclass(frozen=True)
class PackageInfo:
    name: str
    version: str
    task: str
    labels: tuple[str, ...]
    image_size: tuple[int, int]
    max_text_length: int
    embedding_dim: int
    metrics: dict[str, Any]
    model_config: dict[str, Any]


def script_module(model: nn.Module) -> torch.jit.ScriptModule:
    return torchscript.script(model.cpu().eval())


def assert_parity(
    reference: nn.Module, candidate: nn.Module, images: torch.Tensor, tokens: torch.Tensor, what: str
) -> None:
    with torch.inference_mode():
        expected = run_forward(reference, images, tokens)
        actual = run_forward(candidate, images, tokens)
        expected["encode_image"] = reference.encode_image(images)  # type: ignore[operator]
        actual["encode_image"] = candidate.encode_image(images)  # type: ignore[operator]
        expected["encode_text"] = reference.encode_text(tokens)  # type: ignore[operator]
        actual["encode_text"] = candidate.encode_text(tokens)  # type: ignore[operator]
    for name, value in expected.items():
        error = float((value - actual[name]).abs().max())
        if not error <= PARITY_ATOL:
            raise PackageError(f"{what}: {name} differs by {error:.3g} > {PARITY_ATOL}")


def export_package(model: nn.Module, info: PackageInfo, golden: Sequence[GoldenInput], out_dir: Path | str) -> Manifest:
    """Write a verified package to out_dir (replaced atomically: a reader never sees half of one)."""
    if not golden:
        raise ValueError("a package needs at least one golden input")
    return write_atomically(out_dir, lambda staging: _write_package(model, info, golden, staging))


def write_atomically(out_dir: Path | str, write: Callable[[Path], Manifest]) -> Manifest:
    """Build a package in a staging folder beside out_dir, then swap it in; on any failure, remove it."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a package is read by the serving user too
    try:
        manifest = write(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_package(model: nn.Module, info: PackageInfo, golden: Sequence[GoldenInput], staging: Path) -> Manifest:
    cases, images, tokens = stage_golden(info, golden, staging)
    eager = model.cpu().eval()
    scripted = script_module(eager)
    assert_parity(eager, scripted, images, tokens, "eager vs scripted")
    archive = staging / ARCHIVE_NAME
    torchscript.save(scripted, archive)
    reloaded = torchscript.load(archive).eval()
    assert_parity(scripted, reloaded, images, tokens, "scripted vs reloaded archive")
    return record_golden(info, cases, reloaded, images, tokens, staging)


def stage_golden(
    info: PackageInfo, golden: Sequence[GoldenInput], staging: Path
) -> tuple[list[tuple[str, str]], torch.Tensor, torch.Tensor]:
    """Save the golden images into staging; return their (path, text) pairs and the preprocessed inputs.

    The inputs are read back from the saved files through the shared preprocessing, exactly as
    the loader will read them, so the recorded outputs are the ones a server reproduces.
    """
    (staging / GOLDEN_DIR).mkdir()
    cases = []
    for index, case in enumerate(golden):
        name = f"{GOLDEN_DIR}/{index}.png"
        Image.open(io.BytesIO(case.image)).save(staging / name, format="PNG")
        cases.append((name, case.text))
    images, tokens = preprocess_golden(staging, cases, info.image_size, info.max_text_length)
    return cases, images, tokens


def record_golden(
    info: PackageInfo,
    cases: Sequence[tuple[str, str]],
    module: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    staging: Path,
) -> Manifest:
    """Run the archive (as reloaded from staging) on the golden inputs; write the final manifest."""
    archive = staging / ARCHIVE_NAME
    with torch.inference_mode():
        outputs = run_forward(module, images, tokens)
    golden = tuple(
        GoldenCase(
            image=image,
            text=text,
            label=info.labels[int(outputs["logits"][i].argmax())],
            logits=tuple(outputs["logits"][i].tolist()),
            image_embedding=tuple(outputs["image_embedding"][i].tolist()),
            text_embedding=tuple(outputs["text_embedding"][i].tolist()),
        )
        for i, (image, text) in enumerate(cases)
    )
    manifest = _manifest(info, archive_sha256=sha256_file(archive), golden=golden)
    manifest.validate(staging / MANIFEST_NAME)
    (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def _manifest(info: PackageInfo, *, archive_sha256: str, golden: tuple[GoldenCase, ...]) -> Manifest:
    return Manifest(
        name=info.name,
        version=info.version,
        created=datetime.now(UTC).replace(microsecond=0).isoformat(),
        task=info.task,
        labels=info.labels,
        image_size=info.image_size,
        tokenizer=TOKENIZER,
        max_text_length=info.max_text_length,
        embedding_dim=info.embedding_dim,
        archive=ARCHIVE_NAME,
        archive_sha256=archive_sha256,
        metrics=info.metrics,
        golden=golden,
        model_config=info.model_config,
        torch_version=torch.__version__,
    )


def synthetic_golden_inputs() -> list[GoldenInput]:
    """A few drawn pictures with English and Chinese questions: golden inputs for any package."""
    from PIL import ImageDraw

    cases = [
        ((220, 40, 40), "ellipse", "What shape is the red object?"),
        ((40, 80, 220), "rectangle", "蓝色的物体是大还是小？"),
        ((40, 170, 60), "polygon", "Is there a green triangle?"),
        ((245, 130, 30), "ellipse", "离橙色物体最近的物体是什么颜色？"),
    ]
    inputs = []
    for color, shape, text in cases:
        picture = Image.new("RGB", (96, 96), (230, 230, 230))
        draw = ImageDraw.Draw(picture)
        if shape == "polygon":
            draw.polygon([(20, 70), (60, 70), (40, 35)], fill=color)
        else:
            getattr(draw, shape)([20, 30, 60, 70], fill=color)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        inputs.append(GoldenInput(image=buffer.getvalue(), text=text))
    return inputs


def export_random_package(
    out_dir: Path | str, config: Any, labels: Sequence[str], *, seed: int = 0, name: str = "random"
) -> Manifest:
    """Package a randomly initialized FusionModel: serves the full contract, answers nothing useful."""
    from model.config import FusionConfig
    from model.fusion import FusionModel

    assert isinstance(config, FusionConfig)
    torch.manual_seed(seed)
    model = FusionModel(config)
    info = PackageInfo(
        name=name,
        version=f"0.0.0+random.{seed}",
        task="untrained",
        labels=tuple(labels),
        image_size=config.image.size,
        max_text_length=config.text.max_length,
        embedding_dim=config.embed_dim,
        metrics={},
        model_config=config.to_dict(),
    )
    return export_package(model, info, synthetic_golden_inputs(), out_dir)
