"""Model configuration: frozen dataclasses that travel with the weights.

The config is saved next to every checkpoint and inside every model package, so a model can be
rebuilt exactly from what it shipped with (nanoGPT's `GPTConfig(**checkpoint['model_args'])`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TextEncoderKind = Literal["lstm", "transformer"]


@dataclass(frozen=True)
class ImageTowerConfig:
    size: tuple[int, int] = (64, 64)  # [H, W] the preprocessing resizes every image to
    widths: tuple[int, ...] = (24, 48, 64)  # stem width, then one ResNet BasicBlock stage per entry after it
    # The stem and each stage halve the resolution: 64px input -> an 8x8 grid of regions, each 8px,
    # about the size of a small ShapesQA object, for the fusion to attend to.
    stem_stride: int = 2
    context_layers: int = 0  # self-attention layers over the regions before fusion and pooling


@dataclass(frozen=True)
class TextTowerConfig:
    kind: TextEncoderKind = "transformer"
    max_length: int = 192  # token ids (UTF-8 bytes); captions of 6 objects in Chinese reach ~170
    layers: int = 2
    heads: int = 4


@dataclass(frozen=True)
class FusionConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    width: int = 64  # d_model shared by both towers and the fusion blocks (128 trained 4x slower on a CPU)
    fusion_layers: int = 2  # image-stream blocks: cross-attend to text, then self-attend among regions
    # FiLM: the question scales and shifts every region's channels before the image stream, so
    # "is this the object asked about" is one multiplication away rather than learned through attention.
    film: bool = True
    # A learned attention bias per head and per offset between two regions, in the regions' self-
    # attention: nearest / farthest are functions of that offset (model.positions.RelativePositionBias).
    relative_position: bool = True
    fusion_heads: int = 4
    embed_dim: int = 128  # shared contrastive embedding space
    num_labels: int = 22
    dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-shaped (lists, not tuples), so it compares equal to what a manifest reads back."""
        result: dict[str, Any] = json.loads(self.to_json())
        return result

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionConfig:
        image = dict(data.get("image", {}))
        if "size" in image:
            image["size"] = tuple(image["size"])
        if "widths" in image:
            image["widths"] = tuple(image["widths"])
        rest = {k: v for k, v in data.items() if k not in ("image", "text")}
        rest.setdefault("relative_position", False)  # configs written before it existed were built without it
        return cls(image=ImageTowerConfig(**image), text=TextTowerConfig(**data.get("text", {})), **rest)

    @classmethod
    def from_json(cls, text: str) -> FusionConfig:
        return cls.from_dict(json.loads(text))
