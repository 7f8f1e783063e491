"""`python -m trainer fit`: multi-task training (answers + image/caption alignment), then export.

The loop: sample a batch of records (by default whole images with all their questions, each image
encoded once), light augmentation on the in-memory uint8 images, cross-entropy on the answer plus
a CLIP-style contrastive loss between the batch's distinct images and their captions; AdamW with
warm-up and cosine decay, gradient clipping, bf16 autocast on a GPU, checkpoints that `--resume`
continues from. It ends by exporting a verified model package with its evaluation metrics, a
training-curve plot and a model card.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.config import FusionConfig
from model.export import GoldenInput, PackageInfo, export_package
from model.fusion import FusionModel
from model.preprocess import pad_tokens
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.data import TensorDataset, infer_labels, load_dataset
from trainer.evaluate import accuracy_report, evaluate, predict
from trainer.losses import contrastive_loss, first_occurrences
from trainer.optim import build_optimizer, learning_rate
from trainer.params import TrainConfig, parse_args
from trainer.report import write_model_card, write_training_plot
from trainer.sampling import ErrorWeightedSampler, ImageGroupedSampler, RecordSampler
from trainer.shapesqa import LABELS as SHAPESQA_LABELS

GOLDEN_CASES = 6


def resolve_splits(data: Path) -> dict[str, Path]:
    if data.is_file():
        return {"train": data}
    splits = {name: data / name / "data.jsonl" for name in ("train", "val", "test")}
    found = {name: path for name, path in splits.items() if path.is_file()}
    if "train" not in found:
        raise SystemExit(f"{data}: expected {splits['train']} (or pass a JSONL file)")
    return found


def resolve_labels(spec: str, train_file: Path) -> tuple[str, ...]:
    if spec == "shapesqa":
        return SHAPESQA_LABELS
    if spec != "auto":
        return tuple(label.strip() for label in spec.split(","))
    own = infer_labels(train_file)
    # ShapesQA's answers include "0".."6"; a set whose labels are all digits is integer-labelled.
    is_shapesqa = set(own) <= set(SHAPESQA_LABELS) and not all(label.isdigit() for label in own)
    return SHAPESQA_LABELS if is_shapesqa else own


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image channel offsets (color/background jitter) and pixel noise, on uint8 [B,3,H,W].

    Canvas size, JPEG quality and rendering style vary in the data itself (the generator draws
    them per scene), so what is left here is cheap and keeps colors inside SHAPESQA.md's bounds.
    """
    batch = images.shape[0]
    x = images.float()
    x += torch.empty(batch, 3, 1, 1).uniform_(-6.0, 6.0, generator=generator)
    x += torch.randn(x.shape, generator=generator) * torch.empty(batch, 1, 1, 1).uniform_(0.0, 4.0, generator=generator)
    return x.round_().clamp_(0, 255).to(torch.uint8)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        labels: tuple[str, ...],
        train: TensorDataset,
        device: torch.device,
        model_config: FusionConfig,
    ):
        self.config = config
        self.labels = labels
        self.train = train
        self.device = device
        self.model_config = model_config
        torch.manual_seed(config.seed)
        self.model = FusionModel(self.model_config).to(device)
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sampler: Callable[[torch.Generator], torch.Tensor]
        if config.group_by_image:
            self.sampler = ImageGroupedSampler(train, config.batch_size, config.questions_per_image)
        elif config.error_weighted_share:
            self.sampler = ErrorWeightedSampler(train, config.batch_size, config.error_weighted_share)
        else:
            self.sampler = RecordSampler(train, config.batch_size)
        self.step = 0
        self.elapsed = 0.0  # training seconds before this process (kept across --resume)
        self.resumed_at = time.monotonic()
        self.history: list[dict[str, float]] = []
        use_amp = config.amp == "on" or (config.amp == "auto" and device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else nullcontext()

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "model_config": self.model_config.to_dict(),
            "train_config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
            "labels": list(self.labels),
            "step": self.step,
            "elapsed": self.training_seconds(),
            "history": self.history,
            "generator": self.generator.get_state(),
            "qtype_shares": self.sampler.shares() if isinstance(self.sampler, ErrorWeightedSampler) else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self.resumed_at = time.monotonic()
        self.history = list(state["history"])
        self.generator.set_state(state["generator"])
        if isinstance(self.sampler, ErrorWeightedSampler) and state.get("qtype_shares"):
            if not self.sampler.restore(state["qtype_shares"]):
                log("the checkpoint's question types differ from the data's: draws restart from the data's mix")

    def reweight(self, report: dict[str, float]) -> None:
        """Steer the error-weighted sampler (when it is the one) by a validation accuracy report."""
        if isinstance(self.sampler, ErrorWeightedSampler):
            accuracy = {qtype: report.get(f"qtype/{qtype}") for qtype in self.sampler.qtypes}
            self.sampler.update({qtype: 1.0 - value / 100.0 for qtype, value in accuracy.items() if value is not None})

    def training_seconds(self) -> float:
        """Training time of the whole run, across --resume (the checkpoint carries what came before)."""
        return self.elapsed + time.monotonic() - self.resumed_at

    def progress(self) -> float:
        """Fraction of the run done: by steps, or by time when a time budget is set (whichever is further)."""
        done = self.step / self.config.steps
        if self.config.time_budget_min:
            done = max(done, self.training_seconds() / (60 * self.config.time_budget_min))
        return min(done, 1.0)

    def train_step(self) -> dict[str, float]:
        config = self.config
        rows = self.sampler(self.generator)
        images, position, tokens, labels, ids = self.train.distinct_batch(rows)
        images = augment(images, self.generator)
        lr = learning_rate(self.step, self.progress(), config.lr, config.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with self.autocast:
            regions = self.model.image_encoder(images.to(self.device))  # once per distinct image
            out = self.model.answer(regions[position.to(self.device)], tokens.to(self.device))
            answer_loss = F.cross_entropy(out["logits"].float(), labels.to(self.device))
            loss = answer_loss
            align = torch.zeros(())
            firsts = first_occurrences(ids)
            firsts = torch.tensor(
                [int(r) for r in firsts if self.train.captions[int(ids[r])] is not None][: config.contrastive_batch],
                dtype=torch.int64,
            )
            if config.contrastive_weight > 0 and len(firsts) > 1:
                captions = torch.from_numpy(pad_tokens(self.train.caption_tokens(ids[firsts].tolist())))
                text_embedding = self.model.encode_text(captions.to(self.device))
                align = contrastive_loss(
                    out["image_embedding"][firsts.to(self.device)].float(),
                    text_embedding.float(),
                    self.model.logit_scale,
                )
                loss = loss + config.contrastive_weight * align
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.clip)
        self.optimizer.step()
        self.step += 1
        accuracy = float((out["logits"].argmax(1).cpu() == labels).float().mean())
        return {"loss": float(answer_loss.detach()), "align": float(align.detach()), "accuracy": accuracy, "lr": lr}


class ResumeError(ValueError):
    """A checkpoint that cannot go on with this command's data."""


def fit(config: TrainConfig, argv: Sequence[str] = ()) -> dict[str, Any]:
    started = time.monotonic()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    splits = resolve_splits(config.data)
    labels = resolve_labels(config.labels, splits["train"])
    # A resumed run is the checkpoint's model, whatever the defaults have become since it was made.
    resumed = load_checkpoint(config.resume) if config.resume else None
    if resumed is not None and list(resumed["labels"]) != list(labels):
        # Same count, other order: the head's classes would be renamed without a word.
        raise ResumeError(
            f"{config.resume} was trained on the labels {list(resumed['labels'])}, and this command's are"
            f" {list(labels)}: pass --labels with the checkpoint's, in its order"
        )
    model_config = config.model_config(len(labels))
    if resumed is not None and (saved := FusionConfig.from_dict(resumed["model_config"])) != model_config:
        log("the checkpoint's model config differs from this command's: resuming with the checkpoint's")
        model_config = saved
    # The data and the package take the model's input sizes: a resumed model's, not the command's.
    size, max_length = model_config.image.size, model_config.text.max_length
    log(f"decoding data sets ({', '.join(splits)}) at {size[0]}x{size[1]}")
    sets = {name: load_dataset(path, labels, size, max_length, config.workers or None) for name, path in splits.items()}
    trainer = Trainer(config, labels, sets["train"], device, model_config)
    checkpoint_path = config.out.parent / f".{config.out.name}-checkpoint.pt"
    if resumed is not None:
        trainer.restore(resumed)
        log(f"resumed from {config.resume} at step {trainer.step}")
    val = sets.get("val")
    if config.error_weighted_share and val is None:
        log("--error-weighted-share has no validation split to steer by: the draws keep the data's own mix")
    log(
        f"training {sum(p.numel() for p in trainer.model.parameters()):,} parameters on {device}"
        f" for {config.steps} steps or {config.time_budget_min} min"
    )

    window: list[dict[str, float]] = []
    bar = tqdm(total=config.steps, initial=trainer.step, disable=not config.progress, file=sys.stderr, unit="step")
    while trainer.progress() < 1.0:
        tick = time.monotonic()
        stats = trainer.train_step()
        stats["samples_per_s"] = config.batch_size / (time.monotonic() - tick)
        window.append(stats)
        bar.update(1)
        bar.set_postfix(
            loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.3f}", sps=f"{stats['samples_per_s']:.0f}"
        )
        if trainer.step % config.eval_every == 0 or trainer.progress() >= 1.0:
            point = {key: sum(s[key] for s in window) / len(window) for key in window[0]}
            point["step"] = trainer.step
            point["minutes"] = trainer.training_seconds() / 60
            if val is not None:
                report = accuracy_report(val, predict(trainer.model.eval(), val, device=device))
                point["val_accuracy"] = report["all"]
                point["val_relational"] = report.get("relational", float("nan"))
                trainer.reweight(report)
            trainer.history.append(point)
            window = []
            bar.write(" ".join(f"{k}={v:.4g}" for k, v in point.items()), file=sys.stderr)
            if isinstance(trainer.sampler, ErrorWeightedSampler):
                bar.write(
                    "qtype_shares " + " ".join(f"{k}={v:.3f}" for k, v in trainer.sampler.shares().items()),
                    file=sys.stderr,
                )
        if trainer.step % config.checkpoint_every == 0:
            save_checkpoint(checkpoint_path, trainer.state())
    bar.close()
    save_checkpoint(checkpoint_path, trainer.state())
    train_minutes = trainer.training_seconds() / 60

    model = trainer.model.cpu().eval()
    metrics: dict[str, Any] = {"train_minutes": round(train_minutes, 1), "steps": trainer.step}
    for name in ("val", "test"):
        if name in sets:
            metrics[name] = evaluate(model, sets[name])
    info = PackageInfo(
        name=config.name or config.out.name,
        version=config.version,
        task=config.name or config.out.name,
        labels=labels,
        image_size=size,
        max_text_length=max_length,
        embedding_dim=trainer.model_config.embed_dim,
        metrics=metrics,
        model_config=trainer.model_config.to_dict(),
    )
    manifest = export_package(model, info, golden_from(sets.get("val") or sets["train"]), config.out)
    write_training_plot(trainer.history, config.out / "training.png")
    command = "python -m trainer fit " + " ".join(shlex.quote(a) for a in _without_resume(argv))
    write_model_card(config.out / "MODEL_CARD.md", manifest, config, metrics, command, time.monotonic() - started)
    log(f"exported {config.out} ({manifest.archive_sha256[:12]}) in {(time.monotonic() - started) / 60:.1f} min")
    return metrics


def _without_resume(argv: Sequence[str]) -> list[str]:
    """The command that reproduces a run from scratch: a resumed run's arguments less --resume."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return kept


def golden_from(data: TensorDataset) -> list[GoldenInput]:
    """Real records as golden inputs: their original image bytes and texts (spread over the set)."""
    step = max(1, len(data) // GOLDEN_CASES)
    picks = data.records[::step][:GOLDEN_CASES]
    return [GoldenInput(image=Path(r.image).read_bytes(), text=r.text) for r in picks]


def log(message: str) -> None:
    print(f"[trainer] {message}", file=sys.stderr, flush=True)


def fit_main(argv: Sequence[str]) -> int:
    fit(parse_args(argv), argv)
    return 0
