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
