"""POST /embed: an image and/or a text -> embeddings in the shared space (+ their similarity)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.decoding import Decoded
from app.deps import ServingDep
from app.items import FloatArray, Kind, Row
from app.routes.common import infer, json_response, model_ref
from app.schemas import IMAGE_FIELD, TEXT_FIELD, EmbedResponse, error_responses, multipart_body
from model.manifest import Manifest

router = APIRouter(tags=["inference"])


def _kind(decoded: Decoded) -> Kind:
    # Both inputs run the full forward pass, so they batch together with /predict.
    if decoded.image is not None and decoded.tokens is not None:
        return Kind.FUSE
    return Kind.IMAGE if decoded.image is not None else Kind.TEXT


@router.post(
    "/embed",
    summary="Embed an image, a text, or both (with their cosine similarity)",
    response_model=EmbedResponse,
    response_model_exclude_none=True,
    responses=error_responses(400, 401, 408, 413, 415, 422, 429, 500, 503, 504),
    openapi_extra=multipart_body({"image": IMAGE_FIELD, "text": TEXT_FIELD}, []),
)
async def embed(request: Request, serving: ServingDep) -> Response:
    decoded, row = await infer(request, serving, "/embed", serving.decoder.embed, _kind)
    return json_response(embed_body(serving.manifest, row, decoded.image is not None, decoded.tokens is not None))


def embed_body(manifest: Manifest, row: Row, image: bool, text: bool) -> dict[str, Any]:
    """The answer to /embed: the embeddings asked for, and their similarity when both were."""
    # The float32 arrays themselves: json_response writes them without a Python float per value.
    payload: dict[str, Any] = {}
    if image:
        assert row.image_embedding is not None
        payload["image_embedding"] = np.ascontiguousarray(row.image_embedding)
    if text:
        assert row.text_embedding is not None
        payload["text_embedding"] = np.ascontiguousarray(row.text_embedding)
    if image and text:
        assert row.image_embedding is not None and row.text_embedding is not None
        payload["similarity"] = _cosine(row.image_embedding, row.text_embedding)
    payload["dim"] = manifest.embedding_dim
    payload["model"] = model_ref(manifest)
    return payload


def _cosine(a: FloatArray, b: FloatArray) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    similarity = float(np.dot(a, b)) / norms if norms > 0 else 0.0
    return min(1.0, max(-1.0, similarity))  # rounding can step just past +-1
