"""What a training run leaves beside its package: a training-curve plot and a model card."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from model.manifest import Manifest
from trainer.params import TrainConfig


def write_training_plot(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a training host
    import matplotlib.pyplot as plt

    steps = [point["step"] for point in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, [p["loss"] for p in history], label="answer loss")
    left.plot(steps, [p["align"] for p in history], label="alignment loss")
    left.set_xlabel("step")
    left.legend()
    right.plot(steps, [100 * p["accuracy"] for p in history], label="train accuracy (%)")
    if history and "val_accuracy" in history[0]:
        right.plot(steps, [p["val_accuracy"] for p in history], label="val accuracy (%)")
    right.set_xlabel("step")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def write_model_card(
    path: Path, manifest: Manifest, config: TrainConfig, metrics: dict[str, Any], command: str, seconds: float
) -> None:
    lines = [
        f"# {manifest.name} {manifest.version}",
        "",
        f"Task: {manifest.task}. Labels ({len(manifest.labels)}, logit order): {' '.join(manifest.labels)}.",
        f"Input: image resized to {manifest.image_size[0]}x{manifest.image_size[1]} by `model.preprocess`; text as"
        f" UTF-8 bytes, at most {manifest.max_text_length}. Embedding dimension {manifest.embedding_dim}.",
        f"Archive sha256: `{manifest.archive_sha256}`.",
        "",
        "## Reproduce",
        "",
        "```",
        command or "python -m trainer fit --data DATA --out OUT",
        "```",
        "",
        f"Training {metrics.get('train_minutes', 0)} min wall time, {metrics.get('steps')} steps; the whole"
        f" command {seconds / 60:.1f} min (reading the data, training, evaluating, exporting); on"
        f" {platform.machine()} with {_threads(torch.get_num_threads())}, torch {torch.__version__}.",
        "",
        "## Model",
        "",
        "```json",
        json.dumps(manifest.model_config, indent=2),
        "```",
        "",
        "## Evaluation",
        "",
    ]
    for split in ("val", "test"):
        if split in metrics:
            lines += [f"### {split}", "", "```json", json.dumps(metrics[split], indent=2), "```", ""]
    lines += ["![training curves](training.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _threads(count: int) -> str:
    return f"{count} thread" if count == 1 else f"{count} threads"
