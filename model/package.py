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
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import torch

from model import torchscript
from model.preprocess import TOKENIZER, decode_image, pad_tokens, tokenize

MANIFEST_NAME: Final = "manifest.json"
ARCHIVE_NAME: Final = "model.pt"
GOLDEN_DIR: Final = "golden"
FORMAT_VERSION: Final = 1
REQUIRED_METHODS: Final = ("forward", "encode_image", "encode_text")
# Golden outputs are checked to this absolute tolerance: loose enough for another CPU's kernels or
# a GPU's, tight enough that any change of weights or preprocessing shows.
GOLDEN_ATOL: Final = 2e-3


class PackageError(Exception):
    """A model package that must not be served."""


@dataclass(frozen=True)
class GoldenCase:
    image: str  # path relative to the package folder
    text: str
    label: str  # expected arg-max label
    logits: tuple[float, ...]
    image_embedding: tuple[float, ...]
    text_embedding: tuple[float, ...]


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    created: str  # ISO 8601, UTC
    task: str
    labels: tuple[str, ...]  # in logit order
    image_size: tuple[int, int]  # [H, W]
    tokenizer: str
    max_text_length: int
    embedding_dim: int
    archive: str
    archive_sha256: str
    metrics: dict[str, Any] = field(default_factory=dict)
    golden: tuple[GoldenCase, ...] = ()
    model_config: dict[str, Any] = field(default_factory=dict)
    torch_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> Manifest:
        missing = [name for name in _REQUIRED_FIELDS if name not in data]
        if missing:
            raise PackageError(f"{source}: missing field(s): {', '.join(missing)}")
        try:
            golden = tuple(
                GoldenCase(
                    image=str(case["image"]),
                    text=str(case["text"]),
                    label=str(case["label"]),
                    logits=tuple(float(v) for v in case["logits"]),
                    image_embedding=tuple(float(v) for v in case["image_embedding"]),
                    text_embedding=tuple(float(v) for v in case["text_embedding"]),
                )
                for case in data.get("golden", [])
            )
            height, width = (int(v) for v in data["image_size"])
            manifest = cls(
                name=str(data["name"]),
                version=str(data["version"]),
                created=str(data["created"]),
                task=str(data["task"]),
                labels=tuple(str(label) for label in data["labels"]),
                image_size=(height, width),
                tokenizer=str(data["tokenizer"]),
                max_text_length=int(data["max_text_length"]),
                embedding_dim=int(data["embedding_dim"]),
                archive=str(data["archive"]),
                archive_sha256=str(data["archive_sha256"]),
                metrics=dict(data.get("metrics", {})),
                golden=golden,
                model_config=dict(data.get("model_config", {})),
                torch_version=str(data.get("torch_version", "")),
                format_version=int(data.get("format_version", FORMAT_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"{source}: malformed field: {exc}") from exc
        manifest.validate(source)
        return manifest

    def validate(self, source: Path) -> None:
        problems: list[str] = []
        if self.format_version != FORMAT_VERSION:
            problems.append(f"format_version {self.format_version} is not {FORMAT_VERSION}")
        if self.tokenizer != TOKENIZER:
            problems.append(f"tokenizer {self.tokenizer!r} is not {TOKENIZER!r}")
        if not self.labels or len(set(self.labels)) != len(self.labels):
            problems.append("labels must be a non-empty list of distinct strings")
        if min(self.image_size) < 1 or self.max_text_length < 1 or self.embedding_dim < 1:
            problems.append("image_size, max_text_length and embedding_dim must be positive")
        if len(self.archive_sha256) != 64:
            problems.append("archive_sha256 is not a sha256 hex digest")
        for index, case in enumerate(self.golden):
            if len(case.logits) != len(self.labels) or case.label not in self.labels:
                problems.append(f"golden case {index} does not match the labels")
            if len(case.image_embedding) != self.embedding_dim or len(case.text_embedding) != self.embedding_dim:
                problems.append(f"golden case {index} does not match embedding_dim")
        if problems:
            raise PackageError(f"{source}: " + "; ".join(problems))


_REQUIRED_FIELDS: Final = (
    "name",
    "version",
    "created",
    "task",
    "labels",
    "image_size",
    "tokenizer",
    "max_text_length",
    "embedding_dim",
    "archive",
    "archive_sha256",
)


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


def read_manifest(package_dir: Path) -> Manifest:
    path = package_dir / MANIFEST_NAME
    if not path.is_file():
        raise PackageError(f"{path}: manifest not found (is {package_dir} a model package?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PackageError(f"{path}: the manifest must be a JSON object")
    return Manifest.from_dict(data, path)


def load_package(
    package_dir: Path | str, device: torch.device | str = "cpu", *, check_golden: bool = True
) -> ModelPackage:
    """Load and verify a model package onto `device`; raise PackageError on any mismatch."""
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
    return torch.stack(images), pad_tokens(texts)


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
