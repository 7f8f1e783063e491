"""Loading refuses every package that must not be served, with a message naming file and problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from model.export import export_random_package
from model.manifest import MANIFEST_NAME, PackageError
from model.package import ARCHIVE_NAME, load_package, sha256_file, use_ieee_float32
from tests.conftest import TEST_LABELS, tiny_config


@pytest.fixture
def package(tiny_package: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny package that a test may damage."""
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_package, copy)
    return copy


def edit_manifest(package: Path, **changes: object) -> None:
    path = package / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def refused(package: Path) -> str:
    with pytest.raises(PackageError) as caught:
        load_package(package)
    return str(caught.value)


def test_a_good_package_loads_with_its_contract(tiny_package: Path) -> None:
    loaded = load_package(tiny_package)
    assert loaded.manifest.labels == TEST_LABELS
    assert loaded.manifest.image_size == (32, 32)
    assert loaded.manifest.archive_sha256 == sha256_file(tiny_package / ARCHIVE_NAME)
    assert loaded.device == torch.device("cpu")
    with torch.inference_mode():
        out = loaded.module(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.ones(2, 5, dtype=torch.int64))
    assert out["logits"].shape == (2, len(TEST_LABELS))


def test_corrupted_archive(package: Path) -> None:
    archive = package / ARCHIVE_NAME
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    message = refused(package)
    assert str(archive) in message
    assert "does not match the manifest" in message


def test_truncated_archive(package: Path) -> None:
    archive = package / ARCHIVE_NAME
    archive.write_bytes(archive.read_bytes()[:1000])
    assert "does not match the manifest" in refused(package)


def test_empty_archive(package: Path) -> None:
    (package / ARCHIVE_NAME).write_bytes(b"")
    assert refused(package) == f"{package / ARCHIVE_NAME}: archive is empty"


def test_missing_archive(package: Path) -> None:
    (package / ARCHIVE_NAME).unlink()
    assert refused(package) == f"{package / ARCHIVE_NAME}: archive not found"


def test_swapped_archive_fails_its_hash(package: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    export_random_package(other, tiny_config(), TEST_LABELS, seed=7)
    shutil.copy(other / ARCHIVE_NAME, package / ARCHIVE_NAME)
    assert "swapped" in refused(package)


def test_swapped_archive_with_a_matching_hash_fails_the_golden_check(package: Path, tmp_path: Path) -> None:
    """Someone copied other weights and 'fixed' the hash: the golden outputs still catch it."""
    other = tmp_path / "other"
    export_random_package(other, tiny_config(), TEST_LABELS, seed=7)
    shutil.copy(other / ARCHIVE_NAME, package / ARCHIVE_NAME)
    edit_manifest(package, archive_sha256=sha256_file(package / ARCHIVE_NAME))
    message = refused(package)
    assert f"{package / MANIFEST_NAME}: golden case 0" in message
    assert "differs from the shipped output" in message


def test_archive_that_is_not_torchscript(package: Path) -> None:
    archive = package / ARCHIVE_NAME
    archive.write_bytes(b"PK\x03\x04 this is not a TorchScript archive")
    edit_manifest(package, archive_sha256=sha256_file(archive))
    assert refused(package).startswith(f"{archive}: not a loadable TorchScript archive")


def test_missing_manifest(package: Path) -> None:
    (package / MANIFEST_NAME).unlink()
    assert "manifest not found" in refused(package)


def test_manifest_that_is_not_json(package: Path) -> None:
    (package / MANIFEST_NAME).write_text("{not json")
    assert refused(package).startswith(f"{package / MANIFEST_NAME}: not valid JSON")


def test_manifest_missing_fields(package: Path) -> None:
    data = json.loads((package / MANIFEST_NAME).read_text())
    del data["labels"], data["archive_sha256"]
    (package / MANIFEST_NAME).write_text(json.dumps(data))
    assert refused(package) == f"{package / MANIFEST_NAME}: missing field(s): labels, archive_sha256"


def test_manifest_without_its_metrics_or_golden_cases_is_refused(package: Path) -> None:
    """DESIGN.md: the manifest says at least the metrics it was shipped with and its golden cases."""
    data = json.loads((package / MANIFEST_NAME).read_text())
    del data["metrics"], data["golden"]
    (package / MANIFEST_NAME).write_text(json.dumps(data))
    assert refused(package) == f"{package / MANIFEST_NAME}: missing field(s): metrics, golden"
    edit_manifest(package, metrics=[0.9], golden=[])
    assert refused(package) == f"{package / MANIFEST_NAME}: malformed field: metrics must be an object, not list"


def test_manifest_labels_that_do_not_match_the_model(package: Path) -> None:
    edit_manifest(package, labels=list(TEST_LABELS[:-1]))
    assert "golden case 0 does not match the labels" in refused(package)


def test_manifest_with_the_wrong_tokenizer(package: Path) -> None:
    edit_manifest(package, tokenizer="sentencepiece")
    assert "tokenizer 'sentencepiece' is not 'utf8-bytes'" in refused(package)


def test_golden_expectation_that_the_model_does_not_meet(package: Path) -> None:
    data = json.loads((package / MANIFEST_NAME).read_text())
    data["golden"][1]["logits"][0] += 0.5
    (package / MANIFEST_NAME).write_text(json.dumps(data))
    message = refused(package)
    assert "golden case 1" in message
    assert "logits differs from the shipped output by 0.5" in message


def test_missing_golden_image(package: Path) -> None:
    (package / "golden" / "0.png").unlink()
    assert refused(package) == f"{package / 'golden' / '0.png'}: golden image not found"


@pytest.fixture
def float32_settings() -> object:
    """The process-wide TF32 settings, put back after the test."""
    cudnn = cast(Any, torch.backends.cudnn)  # torch >= 2.9's settings; the stubs do not declare them
    settings = (cudnn.conv, cudnn.rnn, torch.backends.cuda.matmul)
    saved = [setting.fp32_precision for setting in settings]
    yield settings
    for setting, value in zip(settings, saved, strict=True):
        setting.fp32_precision = value


def test_on_cuda_float32_means_ieee_float32_and_the_cpu_is_left_alone(float32_settings: tuple[object, ...]) -> None:
    # torch's defaults: cuDNN convolutions and RNNs in TF32, matrix products not set (IEEE).
    assert [setting.fp32_precision for setting in float32_settings] == ["tf32", "tf32", "none"]  # type: ignore[attr-defined]
    use_ieee_float32(torch.device("cpu"))
    assert [setting.fp32_precision for setting in float32_settings] == ["tf32", "tf32", "none"]  # type: ignore[attr-defined]
    use_ieee_float32(torch.device("cuda", 0))
    assert [setting.fp32_precision for setting in float32_settings] == ["ieee", "ieee", "ieee"]  # type: ignore[attr-defined]
