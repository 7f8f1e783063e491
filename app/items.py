"""What a batch is made of: an item's kind, its arrays, and its result row. Numpy only, no torch:
the front-end processes of `--frontends N` build and answer items without loading a model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from app.errors import ModelFailure

FloatArray = npt.NDArray[np.float32]
ByteArray = npt.NDArray[np.uint8]
TokenArray = npt.NDArray[np.int64]


class Kind(enum.StrEnum):
    FUSE = "fuse"
    IMAGE = "image"
    TEXT = "text"

    @property
    def needs_image(self) -> bool:
        return self is not Kind.TEXT

    @property
    def needs_text(self) -> bool:
        return self is not Kind.IMAGE


@dataclass(frozen=True, slots=True)
class Row:
    """One item's outputs; which fields are set depends on the Kind that ran it."""

    probs: FloatArray | None = None  # [C] softmax over the labels
    image_embedding: FloatArray | None = None  # [D]
    text_embedding: FloatArray | None = None  # [D]


RowResult = Row | ModelFailure
