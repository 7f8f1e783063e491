"""Evaluation: accuracy by question type and language (relational questions also by how close
their best and second-best distances are), caption->image retrieval, and the two
ablations that show the fusion does the work (image blanked, text blanked).

Works on anything with the serving contract's three methods: the eager model during training, or
a loaded package's TorchScript module (`python -m trainer eval`).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from model.manifest import MANIFEST_NAME
from model.package import load_package
from model.preprocess import pad_tokens
from trainer.data import TensorDataset, load_dataset

RELATIONAL = frozenset({"nearest", "farthest"})
RETRIEVAL_POOL = 100  # captions are ranked against this many scenes


class ServingModel(Protocol):
    def __call__(self, image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...


@torch.inference_mode()
def predict(
    model: ServingModel,
    data: TensorDataset,
    batch_size: int = 256,
    blank: str = "",
    device: torch.device | None = None,
) -> torch.Tensor:
    """Arg-max label per record, on the host; blank='image' replaces images by uniform gray, 'text'
    empties texts. `device`: where the model is (the data set is in host memory), for validation
    during training on a GPU."""
    predictions = []
    for start in range(0, len(data), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(data)))
        images, tokens, _, _ = data.batch(rows)
        if blank == "image":
            images = torch.full_like(images, 128)
        elif blank == "text":
            tokens = torch.zeros(tokens.shape[0], 1, dtype=torch.int64)
        if device is not None:
            images, tokens = images.to(device), tokens.to(device)
        predictions.append(model(images, tokens)["logits"].argmax(dim=1).cpu())
    return torch.cat(predictions)


MARGIN_EDGES = (0.08, 0.12, 0.2)  # fractions of the canvas; SHAPESQA.md asks nothing under 0.05


def margin_bucket(margin: float) -> str:
    """The band of a relational question's margin (best vs second-best distance, over the canvas)."""
    lower = "0.05"
    for edge in MARGIN_EDGES:
        if margin < edge:
            return f"{lower}-{edge:.2f}"
        lower = f"{edge:.2f}"
    return f"{lower}+"


def accuracy_report(data: TensorDataset, predicted: torch.Tensor) -> dict[str, float]:
    """Accuracy overall, per question type, per language, relational vs not (percent)."""
    correct = (predicted == data.labels).tolist()
    groups: dict[str, list[bool]] = defaultdict(list)
    for record, ok in zip(data.records, correct, strict=True):
        groups["all"].append(ok)
        groups[f"qtype/{record.qtype}"].append(ok)
        groups[f"lang/{record.lang}"].append(ok)
        if record.qtype != "all":
            groups["relational" if record.qtype in RELATIONAL else "non_relational"].append(ok)
        if record.margin is not None:
            groups[f"qtype/{record.qtype}/margin {margin_bucket(record.margin)}"].append(ok)
    return {name: round(100.0 * sum(values) / len(values), 2) for name, values in sorted(groups.items())}


@torch.inference_mode()
def retrieval_recall(model: ServingModel, data: TensorDataset, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Caption -> image recall@k among pools of RETRIEVAL_POOL scenes (percent; averaged over pools)."""
    with_caption = [i for i, caption in enumerate(data.captions) if caption is not None]
    pools = [with_caption[i : i + RETRIEVAL_POOL] for i in range(0, len(with_caption), RETRIEVAL_POOL)]
    pools = [pool for pool in pools if len(pool) == RETRIEVAL_POOL]
    if not pools:
        return {}
    hits = {k: 0 for k in ks}
    total = 0
    for pool in pools:
        images = model.encode_image(data.images[pool])  # (P, D)
        texts = model.encode_text(torch.from_numpy(pad_tokens(data.caption_tokens(pool))))
        similarity = texts @ images.t()  # (P captions, P images)
        # Images scored at least as high as the true one, itself aside: a tie counts against it, so a
        # collapsed embedding (every image the same vector) scores 1 in a pool, not every time.
        rank = (similarity >= similarity.diagonal().unsqueeze(1)).sum(dim=1) - 1
        for k in ks:
            hits[k] += int((rank < k).sum())
        total += len(pool)
    return {f"recall@{k}": round(100.0 * hits[k] / total, 2) for k in ks}


def evaluate(model: ServingModel, data: TensorDataset, ablations: bool = True) -> dict[str, Any]:
    report: dict[str, Any] = {"samples": len(data), "accuracy": accuracy_report(data, predict(model, data))}
    report["retrieval"] = retrieval_recall(model, data)
    if ablations:
        report["text_only_accuracy"] = accuracy_report(data, predict(model, data, blank="image"))["all"]
        report["image_only_accuracy"] = accuracy_report(data, predict(model, data, blank="text"))["all"]
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"samples: {report['samples']}"]
    lines += [f"accuracy {name}: {value:.2f}%" for name, value in report["accuracy"].items()]
    lines += [f"retrieval {name}: {value:.2f}%" for name, value in report.get("retrieval", {}).items()]
    for key in ("text_only_accuracy", "image_only_accuracy"):
        if key in report:
            lines.append(f"{key.replace('_', ' ')}: {report[key]:.2f}%")
    return "\n".join(lines)


def eval_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer eval", description="Evaluate a model package.")
    parser.add_argument("--model", type=Path, required=True, help="a model package folder")
    parser.add_argument("--data", type=Path, required=True, help="a JSONL data set")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--record",
        metavar="NAME",
        default=None,
        help="store the report in the package's manifest under metrics.NAME (the archive is not touched)",
    )
    args = parser.parse_args(list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    package = load_package(args.model)
    manifest = package.manifest
    data = load_dataset(args.data, manifest.labels, manifest.image_size, manifest.max_text_length)
    report = evaluate(package.module, data)
    print(f"model: {manifest.name} {manifest.version}  data: {args.data}")
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.record:
        record_metrics(args.model, args.record, {"data": str(args.data), **report})
    return 0


def record_metrics(package_dir: Path, name: str, report: dict[str, Any]) -> None:
    """Write a report into the manifest's metrics; atomic, so a server never reads half a manifest."""
    path = package_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.setdefault("metrics", {})[name] = report
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(path)
