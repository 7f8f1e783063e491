"""Data sets in the JSONL format of DESIGN.md, decoded once into memory.

A record is `{"image": path relative to the file, "text", "label", optional "caption"}`; `img`
is accepted for `image` (Hateful-Memes files train as they are), and labels are strings or integer
indices into the label list. Extra fields (ShapesQA's `qtype`, `lang`, `margin`) are kept for evaluation.

Every image goes through `model.preprocess.decode_image`, the function the service calls, once:
the decoded uint8 tensors stay in memory, so an epoch costs no decoding at all.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.preprocess import TokenIds, decode_image, pad_tokens, tokenize


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Record:
    image: str  # resolved path
    text: str
    label: int
    caption: str | None
    qtype: str
    lang: str
    margin: float | None = None  # ShapesQA's relational questions: how hard (trainer.shapesqa_scene)


def read_jsonl(path: Path, labels: Sequence[str]) -> list[Record]:
    """Parse a JSONL data set; string labels must be in `labels`, integers index it."""
    index = {label: i for i, label in enumerate(labels)}
    records = []
    strings = False
    ambiguous: tuple[str, int] | None = None  # the first integer that is also a label as text
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: not JSON: {exc}") from exc
            image = row.get("image", row.get("img"))
            if not isinstance(image, str) or "text" not in row or "label" not in row:
                raise DatasetError(f"{where}: a record needs 'image' (or 'img'), 'text' and 'label'")
            label = row["label"]
            strings = strings or isinstance(label, str)
            if ambiguous is None and _names_another_label(label, index):
                ambiguous = (where, label)
            records.append(
                Record(
                    image=str((path.parent / image).resolve()),
                    text=str(row["text"]),
                    label=_label_index(label, index, len(labels), where),
                    caption=row.get("caption"),
                    qtype=str(row.get("qtype", "all")),
                    lang=str(row.get("lang", "all")),
                    margin=float(row["margin"]) if isinstance(row.get("margin"), (int, float)) else None,
                )
            )
    if not records:
        raise DatasetError(f"{path}: no records")
    if strings and ambiguous is not None:
        # A file that writes its labels as text, but `3` here and there, almost surely means the
        # label "3" (ShapesQA's count answers), not index 3: read as an index, it would train or
        # score against another label without a word. Refused, so the file says which it means.
        where, value = ambiguous
        raise DatasetError(
            f"{where}: label {value} is an integer in a file of text labels: as an index it is"
            f" {labels[value]!r}, but {str(value)!r} is a label too; write it as a string, or every label as an index"
        )
    return records


def _names_another_label(value: object, index: dict[str, int]) -> bool:
    """An integer label whose decimal text is a label at another index."""
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return index.get(str(value), value) != value


def _label_index(value: object, index: dict[str, int], count: int, where: str) -> int:
    if isinstance(value, bool):
        raise DatasetError(f"{where}: label must be a string or an integer, not {value!r}")
    if isinstance(value, int):
        if not 0 <= value < count:
            raise DatasetError(f"{where}: label index {value} is outside 0..{count - 1}")
        return value
    if isinstance(value, str) and value in index:
        return index[value]
    raise DatasetError(f"{where}: label {value!r} is not one of the {count} labels")


def infer_labels(path: Path) -> tuple[str, ...]:
    """Labels of a data set that does not name them: its distinct labels, integers as their index."""
    seen: dict[str, None] = {}
    integers: set[int] = set()
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                label = json.loads(line)["label"]
                if isinstance(label, int) and not isinstance(label, bool):
                    integers.add(label)
                else:
                    seen[str(label)] = None
    if integers and seen:
        raise DatasetError(f"{path}: mixes integer and string labels; pass --labels")
    if integers:
        return tuple(str(i) for i in range(max(integers) + 1))
    return tuple(sorted(seen))


def _decode_one(job: tuple[str, tuple[int, int]]) -> np.ndarray:
    path, size = job
    return decode_image(Path(path).read_bytes(), size)


def decode_images(paths: Sequence[str], size: tuple[int, int], workers: int | None = None) -> torch.Tensor:
    """Decode every path with the serving preprocessing: uint8 [N, 3, H, W]."""
    workers = workers or os.cpu_count() or 1
    jobs = [(path, size) for path in paths]
    if not jobs:
        return torch.empty(0, 3, *size, dtype=torch.uint8)
    if workers == 1 or len(jobs) < 64:
        arrays = [_decode_one(job) for job in jobs]
    else:
        # spawn, not fork: forking a process whose torch thread pools are running can deadlock.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            arrays = list(pool.map(_decode_one, jobs, chunksize=256))
    return torch.from_numpy(np.stack(arrays))


@dataclass
class TensorDataset:
    """One data set in memory: unique images once, and per record its image row and tokens."""

    images: torch.Tensor  # uint8 [N_images, 3, H, W]
    image_index: torch.Tensor  # int64 [N_records]
    tokens: list[TokenIds]  # per record int64 [L]
    captions: list[TokenIds | None]  # per unique image
    labels: torch.Tensor  # int64 [N_records]
    records: list[Record]

    def __len__(self) -> int:
        return len(self.records)

    def caption_tokens(self, image_ids: list[int]) -> list[TokenIds]:
        """Caption token ids of these images (each must have a caption)."""
        found = [self.captions[i] for i in image_ids]
        missing = [i for i, caption in zip(image_ids, found, strict=True) if caption is None]
        if missing:
            raise DatasetError(f"images without a caption: {missing[:5]}")
        return [caption for caption in found if caption is not None]

    def records_by_image(self) -> list[torch.Tensor]:
        """The record rows of each image, in image order."""
        order = torch.argsort(self.image_index, stable=True)
        counts = torch.bincount(self.image_index, minlength=len(self.images))
        return list(torch.split(order, counts.tolist()))

    def distinct_batch(
        self, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(distinct images [U,3,H,W], each row's position among them [B], tokens [B,L], labels [B],
        image ids [B]) for the given record rows: an image asked about twice is there once."""
        ids = self.image_index[rows]
        distinct, position = torch.unique(ids, return_inverse=True)
        tokens = torch.from_numpy(pad_tokens([self.tokens[int(r)] for r in rows]))
        return self.images[distinct], position, tokens, self.labels[rows], ids

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images [B,3,H,W], tokens [B,L], labels [B], image ids [B]) for the given record rows."""
        ids = self.image_index[rows]
        return (
            self.images[ids],
            torch.from_numpy(pad_tokens([self.tokens[int(r)] for r in rows])),
            self.labels[rows],
            ids,
        )


def load_dataset(
    path: Path, labels: Sequence[str], size: tuple[int, int], max_length: int, workers: int | None = None
) -> TensorDataset:
    records = read_jsonl(path, labels)
    unique: dict[str, int] = {}
    for record in records:
        unique.setdefault(record.image, len(unique))
    captions: list[TokenIds | None] = [None] * len(unique)
    for record in records:
        if record.caption:
            captions[unique[record.image]] = tokenize(record.caption, max_length).ids
    return TensorDataset(
        images=decode_images(list(unique), size, workers),
        image_index=torch.tensor([unique[r.image] for r in records], dtype=torch.int64),
        tokens=[tokenize(r.text, max_length).ids for r in records],
        captions=captions,
        labels=torch.tensor([r.label for r in records], dtype=torch.int64),
        records=records,
    )
