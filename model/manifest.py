"""A model package's manifest (manifest.json): its fields, their checks, and reading it.

Apart from the archive so that a process that never loads a model (a front-end of `--frontends N`)
reads a package's labels and sizes without importing torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from model.preprocess import TOKENIZER

MANIFEST_NAME: Final = "manifest.json"
FORMAT_VERSION: Final = 1


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
                for case in data["golden"]
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
                metrics=_metrics(data["metrics"]),
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
    "metrics",  # what it scored when shipped; {} for a package nobody evaluated (a random model)
    "golden",  # the cases the server checks before it is ready: a package without them is refused there
)


def _metrics(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"metrics must be an object, not {type(value).__name__}")
    return value


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
