"""`python -m trainer fit` options: argparse over one dataclass, no globals."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from model.config import FusionConfig, ImageTowerConfig, TextTowerConfig


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out: Path
    labels: str = "auto"  # "auto", "shapesqa", or a comma-separated list in logit order
    name: str = ""
    version: str = "1.0.0"
    # model
    text_encoder: str = "transformer"
    image_size: int = 64
    widths: str = "24,48,64"
    stem_stride: int = 2
    context_layers: int = 0
    width: int = 64
    fusion_layers: int = 2
    film: bool = True
    relative_position: bool = True
    text_layers: int = 2
    max_length: int = 192
    embed_dim: int = 128
    dropout: float = 0.0
    # optimisation
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    clip: float = 1.0
    contrastive_weight: float = 0.5
    contrastive_batch: int = 32  # captions per step in the alignment loss
    # Draw whole images, each with all its questions, rather than single records: the image encoder
    # then runs once per image of the batch instead of once per question.
    group_by_image: bool = True
    # With group_by_image, at most this many of an image's questions per draw (0: all of them): more
    # distinct images per batch of the same size, for what the image encoder must see many scenes to learn.
    questions_per_image: int = 0
    # Fraction of the draws steered to question types by their validation error (0: off). Needs
    # single-record draws (--no-group-by-image) and a validation split.
    error_weighted_share: float = 0.0
    time_budget_min: float = 0.0  # stop early (then anneal is cut short) when > 0
    # machinery
    seed: int = 0
    threads: int = 0  # 0: all cores
    device: str = "auto"
    amp: str = "auto"  # bf16 autocast on CUDA when "auto"
    eval_every: int = 250
    checkpoint_every: int = 500
    resume: Path | None = None
    workers: int = 0  # image decoding processes; 0: all cores
    progress: bool = True

    def model_config(self, num_labels: int) -> FusionConfig:
        return FusionConfig(
            image=ImageTowerConfig(
                size=(self.image_size, self.image_size),
                widths=tuple(int(w) for w in self.widths.split(",")),
                stem_stride=self.stem_stride,
                context_layers=self.context_layers,
            ),
            text=TextTowerConfig(kind=self.text_encoder, max_length=self.max_length, layers=self.text_layers),  # type: ignore[arg-type]
            width=self.width,
            fusion_layers=self.fusion_layers,
            film=self.film,
            relative_position=self.relative_position,
            embed_dim=self.embed_dim,
            num_labels=num_labels,
            dropout=self.dropout,
        )


_HELP = {
    "data": "a folder with train/data.jsonl (and val/, test/), or one JSONL file",
    "out": "the model package folder to write, e.g. weights/NAME",
    "labels": "'auto' (ShapesQA's 22 when they fit, else the data's own), 'shapesqa', or a,b,c",
    "text_encoder": "lstm or transformer",
    "widths": "CNN stem width then one ResNet stage per width",
    "time_budget_min": "stop after this many minutes of training, then export",
    "resume": "a checkpoint (.pt) to continue from",
    "group_by_image": "batches of whole images, each with all its questions (its image encoded once)",
    "questions_per_image": "with --group-by-image: at most N of an image's questions per draw, chosen at random"
    " (default 0: all)",
    "error_weighted_share": "with --no-group-by-image: this fraction of the draws goes to question types in"
    " proportion to their error rate at the last validation (default 0: off)",
}


def parse_args(argv: Sequence[str]) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m trainer fit", description="Train a fusion model and export it.")
    for spec in fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default
        if spec.name in ("data", "out"):
            parser.add_argument(flag, type=Path, required=True, help=_HELP[spec.name])
        elif spec.name == "resume":
            parser.add_argument(flag, type=Path, default=None, help=_HELP[spec.name])
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=_HELP.get(spec.name))
        else:
            kind = type(default)
            parser.add_argument(flag, type=kind, default=default, help=_HELP.get(spec.name, f"default {default}"))
    args = parser.parse_args(list(argv))
    config = TrainConfig(**vars(args))
    if config.text_encoder not in ("lstm", "transformer"):
        parser.error("--text-encoder must be lstm or transformer")
    if config.questions_per_image < 0:
        parser.error("--questions-per-image must be >= 0")
    if config.questions_per_image and not config.group_by_image:
        parser.error("--questions-per-image needs --group-by-image (single-question batches draw one per image)")
    if not 0.0 <= config.error_weighted_share < 1.0:
        parser.error("--error-weighted-share must be in [0, 1)")
    if config.error_weighted_share and config.group_by_image:
        parser.error("--error-weighted-share needs --no-group-by-image (it draws single questions)")
    return config
