"""Training objectives: the answer, and the alignment of images with their captions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    image_embedding: torch.Tensor, text_embedding: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): the i-th image and i-th caption are the only positive pair.

    image_embedding, text_embedding: (B, D), L2-normalized; logit_scale: log of the temperature's inverse.
    """
    scale = logit_scale.clamp(max=4.6052).exp()  # cap at 100, as CLIP does, for stability
    logits = scale * image_embedding @ text_embedding.t()  # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def first_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """Row positions of the first appearance of each distinct id, in order of appearance."""
    seen: set[int] = set()
    rows = []
    for row, value in enumerate(ids.tolist()):
        if value not in seen:
            seen.add(value)
            rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)
