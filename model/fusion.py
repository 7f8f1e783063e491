"""FusionModel: image and text towers, cross-attention fusion, a dual-stream head, and a shared
embedding space for contrastive alignment.

    image uint8 [B,3,H,W] --ImageEncoder--> regions [B,N,C] --pool--> image_embedding [B,D]
    tokens int64 [B,L]    --TextEncoder---> words   [B,L,C] --pool--> text_embedding  [B,D]

    image stream: regions attend to the words, then to each other (relations between objects,
                  with a learned bias per offset between two regions)
    text stream:  words attend to the regions
    head: [image stream, text stream, image summary, text summary] -> MLP -> logits [B,K]

The three methods are the serving contract (DESIGN.md): `forward`, `encode_image`, `encode_text`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import FusionConfig
from model.layers import AttentionPool, CrossAttentionBlock, FiLM, NoFiLM, SelfAttentionBlock, masked_mean
from model.positions import NoPositionBias, RelativePositionBias
from model.towers import ImageEncoder, build_text_encoder

_EMBED_QUERIES = 4  # learned pooling queries per modality for the embeddings
_FUSED_QUERIES = 2  # and for the fused image stream


class ImageStreamBlock(nn.Module):
    """Regions gather what the question asks about, then relate to each other."""

    def __init__(self, width: int, heads: int, dropout: float, grid: tuple[int, int] | None) -> None:
        super().__init__()
        self.cross = CrossAttentionBlock(width, heads, dropout)
        self.relate = SelfAttentionBlock(width, heads, dropout)
        self.position_bias: nn.Module = RelativePositionBias(grid, heads) if grid is not None else NoPositionBias()

    def forward(self, regions: Tensor, words: Tensor, word_mask: Tensor) -> Tensor:
        return self.relate(self.cross(regions, words, word_mask), None, self.position_bias())


class FusionModel(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        width = cfg.width
        self.max_length = cfg.text.max_length
        self.image_encoder = ImageEncoder(cfg.image, width, cfg.fusion_heads, cfg.dropout)
        self.text_encoder = build_text_encoder(cfg.text, width, cfg.dropout)

        self.image_pool = AttentionPool(width, cfg.fusion_heads, _EMBED_QUERIES)
        self.text_pool = AttentionPool(width, cfg.fusion_heads, _EMBED_QUERIES)
        self.image_projection = nn.Linear(self.image_pool.out_dim, cfg.embed_dim)
        self.text_projection = nn.Linear(self.text_pool.out_dim, cfg.embed_dim)
        # CLIP's learnable temperature, stored as a log; the trainer reads it for the contrastive loss.
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07)

        self.film: nn.Module = FiLM(width) if cfg.film else NoFiLM()
        grid = self.image_encoder.grid if cfg.relative_position else None
        self.image_stream = nn.ModuleList(
            [ImageStreamBlock(width, cfg.fusion_heads, cfg.dropout, grid) for _ in range(cfg.fusion_layers)]
        )
        self.text_stream = CrossAttentionBlock(width, cfg.fusion_heads, cfg.dropout)
        self.fused_pool = AttentionPool(width, cfg.fusion_heads, _FUSED_QUERIES)
        head_in = self.fused_pool.out_dim + width + self.image_pool.out_dim + self.text_pool.out_dim
        self.head = nn.Sequential(
            nn.LayerNorm(head_in),
            nn.Linear(head_in, 2 * width),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(2 * width, cfg.num_labels),
        )

    def forward(self, image: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        return self.answer(self.image_encoder(image), tokens)

    def answer(self, regions: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        """Everything after the image encoder, on its regions [B,N,C]. The trainer encodes each
        distinct image of a batch once and repeats its regions for every question about it."""
        mask = _token_mask(tokens)  # (B, L)
        words = self.text_encoder(tokens, mask)  # (B, L, C)
        image_summary = self.image_pool(regions, None)  # (B, Q*C)
        text_summary = self.text_pool(words, mask)  # (B, Q*C)

        fused = self.film(regions, masked_mean(words, mask))  # (B, N, C), conditioned on the question
        for block in self.image_stream:
            fused = block(fused, words, mask)  # (B, N, C)
        answered = self.text_stream(words, regions, None)  # (B, L, C)
        streams = [self.fused_pool(fused, None), masked_mean(answered, mask), image_summary, text_summary]
        logits = self.head(torch.cat(streams, dim=1))  # (B, K)
        return {
            "logits": logits,
            "image_embedding": F.normalize(self.image_projection(image_summary), dim=-1),
            "text_embedding": F.normalize(self.text_projection(text_summary), dim=-1),
        }

    @torch.jit.export
    def encode_image(self, image: Tensor) -> Tensor:
        """uint8 [B,3,H,W] -> L2-normalized [B,D]."""
        summary = self.image_pool(self.image_encoder(image), None)
        return F.normalize(self.image_projection(summary), dim=-1)

    @torch.jit.export
    def encode_text(self, tokens: Tensor) -> Tensor:
        """int64 [B,L] -> L2-normalized [B,D]."""
        mask = _token_mask(tokens)
        summary = self.text_pool(self.text_encoder(tokens, mask), mask)
        return F.normalize(self.text_projection(summary), dim=-1)


def _token_mask(tokens: Tensor) -> Tensor:
    """True where a token is real. A row of padding only keeps its first position, so attention
    over it is defined (an empty text is refused before it gets here; this keeps the math finite)."""
    mask = tokens != 0  # (B, L); 0 is PAD_ID (TorchScript cannot read the module constant)
    empty = ~mask.any(dim=1, keepdim=True)  # (B, 1)
    first = torch.zeros_like(mask)
    first[:, 0] = True
    return mask | (empty & first)


def build_model(cfg: FusionConfig) -> FusionModel:
    return FusionModel(cfg)
