"""Optimizer and learning-rate schedule as plain functions."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; biases, norms, embeddings and the temperature are not decayed (decaying them only hurts)."""
    decay: list[nn.Parameter] = []
    keep: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = parameter.ndim < 2 or "embed" in name or "position" in name or "queries" in name
        (keep if no_decay else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def learning_rate(step: int, progress: float, base: float, warmup: int, floor: float = 0.02) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `floor` * base as progress goes 0 -> 1.

    Progress is a fraction rather than a step count so that a run bounded by wall time (the
    trainer's --time-budget-min) still anneals fully by its end.
    """
    if step < warmup:  # 1) warm-up: Adam's early estimates are noisy, keep the first steps small
        return base * (step + 1) / warmup
    if progress >= 1.0:  # 2) past the end (a resumed or extended run): stay at the floor
        return base * floor
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))  # 3) cosine to the floor
