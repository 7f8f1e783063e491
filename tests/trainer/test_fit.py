"""The trainer end to end: generate, fit a few steps, export, load (golden check), evaluate;
and a data set that is not ShapesQA (img key, integer labels, no captions)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from model.package import load_package
from trainer.__main__ import main
from trainer.data import load_dataset
from trainer.fit import ResumeError, Trainer
from trainer.sampling import ErrorWeightedSampler
from trainer.shapesqa import LABELS

TINY_MODEL = [
    "--image-size", "32", "--widths", "8,16,16", "--width", "32", "--text-layers", "1",
    "--fusion-layers", "1", "--embed-dim", "16", "--max-length", "96",
]  # fmt: skip


def fit_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--data", str(data), "--out", str(out), "--steps", "6", "--batch-size", "16",
            "--warmup-steps", "2", "--eval-every", "3", "--checkpoint-every", "3", "--workers", "1",
            "--threads", "1", "--no-progress", *TINY_MODEL, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def shapesqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapesqa")
    argv = ["data", "shapesqa", "--out", str(out), "--train", "40", "--val", "20", "--test", "100", "--seed", "5"]
    assert main([*argv, "--workers", "1", "--max-size", "128"]) == 0
    return out


def test_fit_exports_a_package_that_loads_and_evaluates(
    shapesqa_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "weights" / "smoke"
    assert main(fit_args(shapesqa_dir, out, "--name", "smoke", "--version", "0.1.0")) == 0
    package = load_package(out)  # verifies sha256 and the golden outputs
    manifest = package.manifest
    assert (manifest.name, manifest.version, manifest.labels) == ("smoke", "0.1.0", LABELS)
    assert manifest.image_size == (32, 32)
    assert manifest.metrics["steps"] == 6
    assert set(manifest.metrics["val"]) == {
        "samples", "accuracy", "retrieval", "text_only_accuracy", "image_only_accuracy"
    }  # fmt: skip
    assert manifest.metrics["test"]["retrieval"].keys() == {"recall@1", "recall@5"}
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "MODEL_CARD.md").read_text()
    assert "python -m trainer fit --data" in card and "--steps 6" in card

    capsys.readouterr()
    report = tmp_path / "report.json"
    argv = ["eval", "--model", str(out), "--data", str(shapesqa_dir / "test" / "data.jsonl"), "--json", str(report)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "accuracy all:" in printed and "retrieval recall@1:" in printed
    result = json.loads(report.read_text())
    assert result["samples"] == 100
    assert {"qtype/count", "lang/en", "lang/zh", "relational", "non_relational"} <= result["accuracy"].keys()
    # The same split and the same code as the test metrics fit recorded: the same numbers, from the
    # exported package.
    recorded = manifest.metrics["test"]
    assert (result["accuracy"], result["retrieval"]) == (recorded["accuracy"], recorded["retrieval"])
    assert (result["text_only_accuracy"], result["image_only_accuracy"]) == (
        recorded["text_only_accuracy"],
        recorded["image_only_accuracy"],
    )


def test_resume_continues_from_the_checkpoint_with_its_own_model(
    shapesqa_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "resumed"
    assert main(fit_args(shapesqa_dir, out, "--no-relative-position")) == 0  # a model made without the bias
    checkpoint = tmp_path / ".resumed-checkpoint.pt"
    assert checkpoint.is_file()
    capsys.readouterr()
    # Today's defaults (with the bias), and other input sizes: the checkpoint's model, with its own.
    argv = fit_args(shapesqa_dir, out, "--resume", str(checkpoint), "--image-size", "48", "--max-length", "128")
    argv[argv.index("--steps") + 1] = "9"
    assert main([*argv, "--embed-dim", "24"]) == 0
    assert "resuming with the checkpoint's" in capsys.readouterr().err
    manifest = load_package(out).manifest
    assert manifest.metrics["steps"] == 9
    assert manifest.model_config["relative_position"] is False
    assert (manifest.image_size, manifest.max_text_length, manifest.embedding_dim) == ((32, 32), 96, 16)
    # The same labels in another order would rename the head's classes: refused.
    reordered = ",".join(reversed(LABELS))
    with pytest.raises(ResumeError) as refused:
        main(fit_args(shapesqa_dir, out, "--resume", str(checkpoint), "--labels", reordered))
    assert str(refused.value) == (
        f"{checkpoint} was trained on the labels {list(LABELS)}, and this command's are {list(reversed(LABELS))}:"
        " pass --labels with the checkpoint's, in its order"
    )


def write_generic_set(root: Path) -> Path:
    """A tiny non-ShapesQA set: 'img' paths, integer labels, no captions, like Hateful Memes."""
    (root / "img").mkdir(parents=True)
    lines = []
    for index in range(24):
        color = (200, 30, 30) if index % 2 else (30, 30, 200)
        Image.new("RGB", (40, 30), color).save(root / "img" / f"{index}.png")
        lines.append(json.dumps({"id": index, "img": f"img/{index}.png", "text": f"meme {index}", "label": index % 2}))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fit_reads_a_generic_jsonl_data_set(tmp_path: Path) -> None:
    data = write_generic_set(tmp_path / "memes")
    out = tmp_path / "memes-model"
    assert main(fit_args(data, out)) == 0
    manifest = load_package(out).manifest
    assert manifest.labels == ("0", "1")
    assert manifest.metrics["steps"] == 6


def test_error_weighted_draws_are_steered_by_validation_and_saved_exactly(
    shapesqa_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "weighted"
    capsys.readouterr()
    assert main(fit_args(shapesqa_dir, out, "--no-group-by-image", "--error-weighted-share", "0.5")) == 0
    logged = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qtype_shares ")]
    assert len(logged) == 2  # one per evaluation (steps 3 and 6)
    state = torch.load(tmp_path / ".weighted-checkpoint.pt", weights_only=False)
    shares = state["qtype_shares"]
    assert set(shares) == {"shape", "size", "exists", "count", "side", "nearest", "farthest"}
    assert sum(shares.values()) == pytest.approx(1.0)
    # Steered: the error-weighted half moved the shares away from the data's own mix.
    natural = ErrorWeightedSampler(
        load_dataset(shapesqa_dir / "train" / "data.jsonl", LABELS, (32, 32), 96, 1), 16, 0.5
    )
    assert shares != natural.shares()


def test_validation_accuracy_steers_the_draws_toward_the_types_it_gets_wrong(shapesqa_dir: Path) -> None:
    """Trainer.reweight turns a validation report (accuracy in percent per question type) into error
    rates: the type it gets most wrong gets the most of the error-weighted half, one it gets right none."""
    sampler = ErrorWeightedSampler(
        load_dataset(shapesqa_dir / "train" / "data.jsonl", LABELS, (32, 32), 96, 1), 16, 0.5
    )
    natural = sampler.shares()
    report = {f"qtype/{qtype}": 100.0 for qtype in sampler.qtypes} | {"qtype/nearest": 40.0, "qtype/count": 80.0}
    Trainer.reweight(SimpleNamespace(sampler=sampler), report)  # type: ignore[arg-type]
    errors = {"nearest": 0.6, "count": 0.2}
    expected = {qtype: 0.5 * share + 0.5 * errors.get(qtype, 0.0) / 0.8 for qtype, share in natural.items()}
    assert sampler.shares() == pytest.approx(expected, abs=1e-12)
    assert sampler.shares()["nearest"] == pytest.approx(0.5 * natural["nearest"] + 0.375, abs=1e-12)
