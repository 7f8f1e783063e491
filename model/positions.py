"""Relative position bias for attention over the regions of an image's grid.

No `from __future__ import annotations` here: TorchScript must see the buffer's class-level
annotation as a real type, not a string.
"""

import torch
from torch import Tensor, nn


class RelativePositionBias(nn.Module):
    """A learned bias on attention logits per head and per offset between two cells of a grid
    (Swin Transformer's relative position bias): [1, heads, N, N] for the N = h*w cells.

    "Closest to" and "farthest from" are functions of the offset between two regions; with a
    bias per offset a head can prefer near or far regions directly, instead of learning to read
    distance out of dot products of position codes. Zero at the start: attention as without it.
    """

    index: Tensor

    def __init__(self, grid: tuple[int, int], heads: int) -> None:
        super().__init__()
        height, wide = grid
        self.table = nn.Parameter(torch.zeros(heads, (2 * height - 1) * (2 * wide - 1)))
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(wide), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()  # (N,) each, row-major like the regions
        dy = ys[:, None] - ys[None, :] + height - 1  # (N, N) in [0, 2h-2]
        dx = xs[:, None] - xs[None, :] + wide - 1
        self.register_buffer("index", dy * (2 * wide - 1) + dx, persistent=False)

    def forward(self) -> Tensor:
        return self.table[:, self.index].unsqueeze(0)  # (1, heads, N, N)


class NoPositionBias(nn.Module):
    """RelativePositionBias's stand-in when it is off."""

    def forward(self) -> Tensor | None:
        return None
