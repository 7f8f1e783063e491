"""The two encoders: a ResNet-family CNN over uint8 images, and a byte-level text encoder.

No `from __future__ import annotations` here: TorchScript must see the buffers' class-level
annotations as real types, not strings.
"""

import math

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from model.config import ImageTowerConfig, TextTowerConfig
from model.layers import SelfAttentionBlock
from model.preprocess import PAD_ID

VOCAB_SIZE = 257  # 256 byte values + 1, and 0 for padding


class ImageEncoder(nn.Module):
    """uint8 [B,3,H,W] -> region tokens [B, N, width], one per cell of the final feature map.

    The fusion needs *where* things are, not one pooled vector: coordinate channels enter at the
    stem (so features know their exact position, finer than a grid cell), and each region is
    tagged with a fixed 2-D sine/cosine code of its cell plus a learned embedding. The fixed code
    is added after the features are normalized and at a comparable scale: a learned embedding that
    starts near zero stayed a tenth of the features' norm after a whole training run, and questions
    about position stayed at chance. Its lowest frequency is monotonic across the image, so "left
    or right" is linear in it; dot products of the higher ones vary with the offset between two
    cells, which is what attention needs to compare distances.
    """

    mean: Tensor
    inv_std: Tensor
    coords: Tensor
    fixed_position: Tensor

    def __init__(self, cfg: ImageTowerConfig, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        height, wide = cfg.size
        # Normalization happens here, in float, on the device: clients send uint8.
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 127.5))
        self.register_buffer("inv_std", torch.full((1, 3, 1, 1), 1.0 / 64.0))
        ys = torch.linspace(-1.0, 1.0, height).view(1, 1, height, 1).expand(1, 1, height, wide)
        xs = torch.linspace(-1.0, 1.0, wide).view(1, 1, 1, wide).expand(1, 1, height, wide)
        self.register_buffer("coords", torch.cat([xs, ys], dim=1).contiguous())  # (1, 2, H, W)

        stem_width = cfg.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(5, stem_width, kernel_size=3, stride=cfg.stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        previous = stem_width
        for stage_width in cfg.widths[1:]:
            downsample = nn.Sequential(
                nn.Conv2d(previous, stage_width, kernel_size=1, stride=2, bias=False), nn.BatchNorm2d(stage_width)
            )
            stages.append(BasicBlock(previous, stage_width, stride=2, downsample=downsample))
            previous = stage_width
        self.stages = nn.Sequential(*stages)
        stride = cfg.stem_stride * 2 ** (len(cfg.widths) - 1)
        self.grid = (height // stride, wide // stride)
        self.project = nn.Linear(previous, width)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("fixed_position", sincos_grid(self.grid[0], self.grid[1], width))
        self.position = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], width) * 0.02)
        self.context = nn.ModuleList([SelfAttentionBlock(width, heads, dropout) for _ in range(cfg.context_layers)])

    def forward(self, image: Tensor) -> Tensor:
        batch = image.shape[0]
        x = (image.float() - self.mean) * self.inv_std  # (B, 3, H, W)
        x = torch.cat([x, self.coords.expand(batch, -1, -1, -1)], dim=1)  # (B, 5, H, W)
        x = self.stages(self.stem(x))  # (B, C, h, w)
        x = self.norm(self.project(x.flatten(2).transpose(1, 2)))  # (B, h*w, width)
        x = x + self.fixed_position + self.position
        for block in self.context:  # pre-norm blocks: every consumer of the regions normalizes them
            x = block(x, None)
        return x


def sincos_grid(height: int, wide: int, width: int) -> Tensor:
    """Fixed position code of an h x w grid: [1, h*w, width], half the channels for x, half for y.

    Cell centers map to (0, 1); frequencies run geometrically from a half period across the image
    to a period of two cells (the finest a grid carries); each cell's code has unit RMS, like a feature.
    """
    if width % 4 != 0:
        raise ValueError(f"the position code needs a width divisible by 4, got {width}")
    n = width // 4  # frequencies per axis, each as a sine and a cosine
    top = math.pi * max(height, wide)  # a period of two cells
    frequencies = (math.pi / 2) * (top / (math.pi / 2)) ** (torch.arange(n, dtype=torch.float64) / max(n - 1, 1))
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    xs = (torch.arange(wide, dtype=torch.float64) + 0.5) / wide
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each

    def code(values: Tensor) -> Tensor:
        angles = values.reshape(-1, 1) * frequencies  # (h*w, n)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (h*w, 2n)

    table = torch.cat([code(grid_x), code(grid_y)], dim=1) * math.sqrt(2.0)  # sin^2 + cos^2 = 1: unit RMS per cell
    return table.unsqueeze(0).to(torch.float32)  # (1, h*w, width)


class TransformerTextEncoder(nn.Module):
    """Byte tokens [B, L] -> token features [B, L, width], padding masked out of attention."""

    def __init__(self, cfg: TextTowerConfig, width: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, width, padding_idx=PAD_ID)
        self.position = nn.Parameter(torch.randn(1, cfg.max_length, width) * 0.02)
        self.blocks = nn.ModuleList([SelfAttentionBlock(width, cfg.heads, dropout) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position[:, :length]  # (B, L, width)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


class LSTMTextEncoder(nn.Module):
    """Bidirectional LSTM over byte tokens, exact under right padding.

    A plain bidirectional LSTM over a padded batch would start its backward pass on the padding,
    so an item's features would depend on the batch it sits in. Instead the backward direction
    runs a forward LSTM over each sequence reversed *within its own length*.
    """

    def __init__(self, cfg: TextTowerConfig, width: int, dropout: float) -> None:
        super().__init__()
        if width % 2 != 0:
            raise ValueError("the lstm text encoder needs an even width")
        self.embed = nn.Embedding(VOCAB_SIZE, width, padding_idx=PAD_ID)
        half = width // 2
        self.forward_lstm = nn.LSTM(width, half, num_layers=cfg.layers, batch_first=True, dropout=dropout)
        self.backward_lstm = nn.LSTM(width, half, num_layers=cfg.layers, batch_first=True, dropout=dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        x = self.embed(tokens)  # (B, L, width)
        ahead, _ = self.forward_lstm(x)  # (B, L, width/2); padding comes after the valid tokens
        reverse = _reverse_within_length(mask)  # (B, L) gather index
        index = reverse.unsqueeze(-1)
        behind, _ = self.backward_lstm(x.gather(1, index.expand(-1, -1, x.shape[2])))
        behind = behind.gather(1, index.expand(-1, -1, behind.shape[2]))  # back to the original order
        return self.norm(torch.cat([ahead, behind], dim=-1))


def _reverse_within_length(mask: Tensor) -> Tensor:
    """Index that reverses positions [0, n) of each row and leaves the padding where it is."""
    lengths = mask.sum(1, keepdim=True)  # (B, 1)
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)  # (1, L)
    return torch.where(positions < lengths, lengths - 1 - positions, positions)  # (B, L)


def build_text_encoder(cfg: TextTowerConfig, width: int, dropout: float) -> nn.Module:
    if cfg.kind == "transformer":
        return TransformerTextEncoder(cfg, width, dropout)
    if cfg.kind == "lstm":
        return LSTMTextEncoder(cfg, width, dropout)
    raise ValueError(f"unknown text encoder kind {cfg.kind!r}; choose 'lstm' or 'transformer'")
