"""POST /predict: an image and a question -> the most probable labels."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.decoding import Decoded
from app.deps import ServingDep
from app.items import FloatArray, Kind
from app.routes.common import infer, json_response, model_ref
from app.schemas import IMAGE_FIELD, TEXT_FIELD, TOP_K_FIELD, PredictResponse, error_responses, multipart_body
from model.manifest import Manifest

router = APIRouter(tags=["inference"])


def _fuse(_: Decoded) -> Kind:
    return Kind.FUSE


@router.post(
    "/predict",
    summary="Classify an image and a text together",
    response_model=PredictResponse,
    responses=error_responses(400, 401, 408, 413, 415, 422, 429, 500, 503, 504),
    openapi_extra=multipart_body({"image": IMAGE_FIELD, "text": TEXT_FIELD, "top_k": TOP_K_FIELD}, ["image", "text"]),
)
async def predict(request: Request, serving: ServingDep) -> Response:
    decoded, row = await infer(request, serving, "/predict", serving.decoder.predict, _fuse)
    assert row.probs is not None
    return json_response(predict_body(serving.manifest, row.probs, decoded.top_k))


def predict_body(manifest: Manifest, probs: FloatArray, top_k: int) -> dict[str, Any]:
    """The answer to /predict: the top_k labels, most probable first (ties by label index)."""
    # In Python on a list of 22, not np.argsort: numpy releases the GIL around its sort, and the
    # event loop then waits for the GIL behind the decode and inference threads.
    scores = probs.tolist()
    best = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:top_k]  # stable
    ranked = [{"label": manifest.labels[i], "score": scores[i]} for i in best]
    return {"label": ranked[0]["label"], "score": ranked[0]["score"], "top_k": ranked, "model": model_ref(manifest)}
