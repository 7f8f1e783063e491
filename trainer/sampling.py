"""Which records make up a training batch."""

from __future__ import annotations

import torch

from trainer.data import TensorDataset


class RecordSampler:
    """Records drawn uniformly at random, with replacement."""

    def __init__(self, data: TensorDataset, batch_size: int) -> None:
        self.count = len(data)
        self.batch_size = batch_size

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.count, (self.batch_size,), generator=generator)


class ImageGroupedSampler:
    """Images drawn uniformly at random, each bringing all its records, until the batch is full.

    ShapesQA asks several questions about each scene; with all of them in one batch the image
    encoder runs once per scene. The last image drawn may lose the records that do not fit.
    `per_image` > 0 caps an image's records per draw at a random subset of that many, so a batch
    holds more distinct images (0: all; the draws are then the same as without a cap).
    """

    def __init__(self, data: TensorDataset, batch_size: int, per_image: int = 0) -> None:
        self.groups = [group for group in data.records_by_image() if len(group)]
        self.batch_size = batch_size
        self.per_image = per_image

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        rows: list[torch.Tensor] = []
        filled = 0
        while filled < self.batch_size:
            for image in torch.randint(len(self.groups), (self.batch_size,), generator=generator).tolist():
                group = self._records(image, generator)
                rows.append(group)
                filled += len(group)
                if filled >= self.batch_size:
                    break
        return torch.cat(rows)[: self.batch_size]

    def _records(self, image: int, generator: torch.Generator) -> torch.Tensor:
        group = self.groups[image]
        if 0 < self.per_image < len(group):
            return group[torch.randperm(len(group), generator=generator)[: self.per_image]]
        return group


class ErrorWeightedSampler:
    """Records drawn by question type: part at the data's own mix, part where validation errs most.

    The question types of one data set are learned at very different speeds (ShapesQA's relational
    questions lag the others by thousands of steps), and which one lags changes with the data. With
    `share` > 0 that fraction of the draws goes to question types in proportion to their latest
    validation error rate, so the lagging type gets more of the batch for as long as it lags, and
    gives it back once it has caught up. Within a type the records are drawn uniformly. Before the
    first evaluation, or with share 0, the draws are those of `RecordSampler`.
    """

    def __init__(self, data: TensorDataset, batch_size: int, share: float) -> None:
        if not 0.0 <= share < 1.0:
            raise ValueError(f"share must be in [0, 1), got {share}")
        self.batch_size = batch_size
        self.share = share
        qtypes = [record.qtype for record in data.records]
        self.qtypes = sorted(set(qtypes))
        column = {qtype: i for i, qtype in enumerate(self.qtypes)}
        kind = torch.tensor([column[qtype] for qtype in qtypes])
        self.rows = [torch.nonzero(kind == i).flatten() for i in range(len(self.qtypes))]
        self.natural = torch.tensor([len(rows) for rows in self.rows], dtype=torch.float64) / len(kind)
        self.probabilities = self.natural.clone()

    def shares(self) -> dict[str, float]:
        """Each question type's expected share of a batch, now (exact: a checkpoint restores it)."""
        return dict(zip(self.qtypes, self.probabilities.tolist(), strict=True))

    def update(self, error_rates: dict[str, float]) -> None:
        """Re-weight from validation error rates (0 to 1) per question type. A type validation did
        not measure counts as the mean of those it did: unmeasured is not learned."""
        measured = [max(0.0, rate) for qtype, rate in error_rates.items() if qtype in self.qtypes]
        if not measured:
            return
        mean = sum(measured) / len(measured)
        errors = torch.tensor([max(0.0, error_rates.get(qtype, mean)) for qtype in self.qtypes], dtype=torch.float64)
        total = float(errors.sum())
        if total <= 0.0:
            self.probabilities = self.natural.clone()
            return
        self.probabilities = (1.0 - self.share) * self.natural + self.share * errors / total

    def restore(self, shares: dict[str, float]) -> bool:
        """Probabilities saved by `shares()` (a checkpoint's). False, and the data's own mix kept,
        when the checkpoint's question types are not this data's."""
        if set(shares) != set(self.qtypes):
            return False
        self.probabilities = torch.tensor([shares[qtype] for qtype in self.qtypes], dtype=torch.float64)
        return True

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        kinds = torch.multinomial(self.probabilities, self.batch_size, replacement=True, generator=generator)
        drawn = torch.empty(self.batch_size, dtype=torch.int64)
        for i, rows in enumerate(self.rows):
            where = kinds == i
            count = int(where.sum())
            if count:
                drawn[where] = rows[torch.randint(len(rows), (count,), generator=generator)]
        return drawn
