"""Attention building blocks shared by the towers and the fusion (TorchScript-clean).

Written on `F.scaled_dot_product_attention` rather than `nn.TransformerEncoderLayer`, whose
inference fast path switches to nested tensors depending on the batch: here a padded batch must
give the same numbers as each item alone, so every code path is the same at every batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention of `x` over `context` (self-attention when they are the same tensor)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None, bias: Tensor | None = None) -> Tensor:
        """`bias`, when given, is added to the attention logits: (1 or B, h, N, M)."""
        batch, n, width = x.shape  # B, N queries, C
        m = context.shape[1]  # M keys
        head_dim = width // self.heads
        q = self.query(x).view(batch, n, self.heads, head_dim).transpose(1, 2)  # (B, h, N, hd)
        kv = self.key_value(context).view(batch, m, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)  # (2, B, h, M, hd)
        attn_mask: Tensor | None = None
        if key_mask is not None:
            attn_mask = key_mask[:, None, None, :]  # (B, 1, 1, M), True = attend
        if bias is not None:
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attn_mask, dropout_p=p)  # (B, h, N, hd)
        return self.out(y.transpose(1, 2).reshape(batch, n, width))


class FeedForward(nn.Module):
    def __init__(self, width: int, dropout: float, expansion: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, expansion * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(expansion * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = FeedForward(width, dropout)

    def forward(self, x: Tensor, mask: Tensor | None, bias: Tensor | None = None) -> Tensor:
        h = self.norm_attn(x)
        x = x + self.attn(h, h, mask, bias)
        return x + self.mlp(self.norm_mlp(x))


class CrossAttentionBlock(nn.Module):
    """Queries from one modality attend to the other's tokens, then a feed-forward layer."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(width)
        self.norm_context = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = FeedForward(width, dropout)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm_query(x), self.norm_context(context), context_mask)
        return x + self.mlp(self.norm_mlp(x))


class AttentionPool(nn.Module):
    """Learned queries attend over tokens; their outputs, concatenated, are the pooled vector.

    Several queries keep more than a mean would: an ordered list of objects, or the one region a
    question is about.
    """

    def __init__(self, width: int, heads: int, queries: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, queries, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attn = Attention(width, heads, 0.0)
        self.out_dim = queries * width

    def forward(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        batch = tokens.shape[0]
        queries = self.queries.expand(batch, -1, -1)  # (B, Q, C)
        pooled = self.attn(queries, self.norm(tokens), mask)  # (B, Q, C)
        return pooled.reshape(batch, self.out_dim)  # (B, Q*C)


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid tokens: tokens (B, L, C), mask (B, L) True = valid -> (B, C)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al., 2018): tokens * (1 + gamma(q)) + beta(q).

    Starts as the identity (zero-initialized), so enabling it never makes an untrained model worse.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale_shift = nn.Linear(width, 2 * width)
        nn.init.zeros_(self.scale_shift.weight)
        nn.init.zeros_(self.scale_shift.bias)

    def forward(self, tokens: Tensor, condition: Tensor) -> Tensor:
        gamma, beta = self.scale_shift(condition).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, C) each
        return tokens * (1.0 + gamma) + beta


class NoFiLM(nn.Module):
    """FiLM's stand-in when it is off: the same signature, the tokens unchanged."""

    def forward(self, tokens: Tensor, condition: Tensor) -> Tensor:
        return tokens
