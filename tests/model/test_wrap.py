"""model.wrap: a user's TorchScript archive becomes a package the loader accepts, or is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from model import torchscript
from model.export import script_module
from model.fusion import FusionModel
from model.manifest import PackageError
from model.package import load_package
from model.wrap import main, wrap_archive
from tests.conftest import TEST_LABELS, tiny_config

LABELS = ",".join(TEST_LABELS)


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scripted tiny FusionModel saved as a bare archive: what a user brings."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("archives") / "user-model.pt"
    torchscript.save(script_module(FusionModel(tiny_config())), path)
    return path


def cli(archive: Path, out: Path, *extra: str, labels: str = LABELS) -> list[str]:
    return [
        str(archive),
        "--out",
        str(out),
        "--name",
        "user",
        "--version",
        "2.0.0",
        "--labels",
        labels,
        "--image-size",
        "32,32",
        "--max-text-length",
        "64",
        *extra,
    ]


def test_wrapped_archive_loads_with_its_golden_check(tiny_archive: Path, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"accuracy": 0.5}))
    out = tmp_path / "pkg"
    assert main(cli(tiny_archive, out, "--task", "vqa", "--metrics", str(metrics))) == 0
    package = load_package(out)  # sha256, methods and the golden outputs through the shared preprocessing
    manifest = package.manifest
    assert (manifest.name, manifest.version, manifest.task) == ("user", "2.0.0", "vqa")
    assert manifest.labels == TEST_LABELS
    assert manifest.image_size == (32, 32)
    assert manifest.max_text_length == 64
    assert manifest.embedding_dim == tiny_config().embed_dim  # discovered by running the model
    assert manifest.metrics == {"accuracy": 0.5}
    assert len(manifest.golden) == 4
    assert (out / "model.pt").read_bytes() == tiny_archive.read_bytes()  # copied byte for byte


class _Base(nn.Module):
    """A minimal contract-following model; subclasses break one rule each."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, len(TEST_LABELS))
        self.dim = 8

    def _image(self, image: torch.Tensor) -> torch.Tensor:
        pooled = image.float().mean(dim=(2, 3)) / 255.0
        return nn.functional.normalize(torch.cat([pooled, torch.ones(image.shape[0], 5)], dim=1), dim=1)

    def _text(self, tokens: torch.Tensor) -> torch.Tensor:
        counts = (tokens > 0).float().sum(dim=1, keepdim=True)
        return nn.functional.normalize(torch.cat([counts, torch.ones(tokens.shape[0], 7)], dim=1), dim=1)

    @torch.jit.export
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self._image(image)

    @torch.jit.export
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._text(tokens)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(image.float().mean(dim=(2, 3)))
        return {"logits": logits, "image_embedding": self._image(image), "text_embedding": self._text(tokens)}


class _NoEncodeText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Base()

    @torch.jit.export
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_image(image)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.inner.forward(image, tokens)


class _WrongKeys(_Base):
    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.head(image.float().mean(dim=(2, 3))), "embedding": self._image(image)}


class _NotNormalized(_Base):
    @torch.jit.export
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self._image(image) * 3.0

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(image.float().mean(dim=(2, 3)))
        return {"logits": logits, "image_embedding": self._image(image) * 3.0, "text_embedding": self._text(tokens)}


class _Disagrees(_Base):
    @torch.jit.export
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._text(tokens).flip(dims=[1])


def save(model: nn.Module, path: Path) -> Path:
    torchscript.save(torchscript.script(model.eval()), path)
    return path


def wrap(archive: Path, out: Path, **overrides: Any) -> None:
    options: dict[str, Any] = {
        "name": "user",
        "version": "1",
        "labels": TEST_LABELS,
        "image_size": (32, 32),
        "max_text_length": 64,
    }
    wrap_archive(archive, out, **{**options, **overrides})


def test_a_minimal_contract_model_wraps(tmp_path: Path) -> None:
    wrap(save(_Base(), tmp_path / "base.pt"), tmp_path / "pkg")
    assert load_package(tmp_path / "pkg").manifest.embedding_dim == 8


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_NoEncodeText(), "missing method(s) encode_text"),
        (_WrongKeys(), "forward must return a dict with keys logits, image_embedding, text_embedding"),
        (_NotNormalized(), "is not L2-normalized"),
        (_Disagrees(), "encode_text differs from forward's embedding"),
    ],
    ids=["missing-method", "wrong-output-keys", "not-normalized", "methods-disagree"],
)
def test_archives_that_break_the_contract_are_refused(model: nn.Module, message: str, tmp_path: Path) -> None:
    archive = save(model, tmp_path / "bad.pt")
    with pytest.raises(PackageError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")):
        wrap(archive, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()  # nothing half-written is left behind


def test_label_count_must_match_the_logits(tiny_archive: Path, tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="has 22 columns but 3 labels were given"):
        wrap(tiny_archive, tmp_path / "pkg", labels=("a", "b", "c"))


def test_wrong_image_size_is_refused_with_the_failing_call(tiny_archive: Path, tmp_path: Path) -> None:
    # The tiny model's position embeddings fit a 32x32 input only.
    with pytest.raises(PackageError, match=r"forward failed on inputs \(4, 3, 48, 48\) uint8"):
        wrap(tiny_archive, tmp_path / "pkg", image_size=(48, 48))


def test_the_command_line_refuses_a_file_that_is_not_an_archive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip at all")
    assert main(cli(junk, tmp_path / "pkg")) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "not a loadable TorchScript archive" in err
