"""Response bodies (pydantic, so the OpenAPI document describes every field) and the multipart
request bodies, which the routes parse themselves and document here by hand."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.config import Precision


class ModelRef(BaseModel):
    name: str = Field(description="model package name")
    version: str = Field(description="model package version; also in the X-Model-Version header")


class LabelScore(BaseModel):
    label: str = Field(description="a label of the model, from the manifest")
    score: float = Field(ge=0, le=1, description="softmax probability of this label")


class PredictResponse(BaseModel):
    label: str = Field(description="the most probable label")
    score: float = Field(ge=0, le=1, description="its softmax probability")
    top_k: list[LabelScore] = Field(description="the top_k most probable labels, most probable first")
    model: ModelRef


class EmbedResponse(BaseModel):
    image_embedding: list[float] | None = Field(
        None, description="L2-normalized image embedding [dim]; present when an image was sent"
    )
    text_embedding: list[float] | None = Field(
        None, description="L2-normalized text embedding [dim]; present when a text was sent"
    )
    similarity: float | None = Field(
        None, ge=-1, le=1, description="cosine similarity of the two embeddings; present when both were sent"
    )
    dim: int = Field(description="embedding dimension")
    model: ModelRef


class HealthResponse(BaseModel):
    status: str = Field(description="alive, or dead")
    reason: str | None = Field(None, description="why the process should be restarted (when dead)")


class ReadinessResponse(BaseModel):
    status: str = Field(description="ready, or not_ready")
    reason: str | None = Field(
        None, description="when not ready: loading, warming_up, self_check, draining, or a failure"
    )


class ModelInfo(BaseModel):
    name: str
    version: str
    task: str
    created: str = Field(description="ISO 8601 creation time of the package")
    sha256: str = Field(description="sha256 of the TorchScript archive")
    labels: list[str] = Field(description="labels in logit order")
    image_size: list[int] = Field(description="[H, W] every image is resized to")
    max_text_length: int = Field(description="longest accepted text, in UTF-8 bytes after NFC normalization")
    embedding_dim: int


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_wait_ms: float = Field(description="extra wait for a fuller batch when idle (0: none)")
    gather_ms: float = Field(description="longest wait, when the device frees, for requests still decoding")
    lookahead_ms: float = Field(
        description="how long before the running batch is expected to end the next one is handed to the device"
    )
    max_queue: int = Field(description="admitted requests not yet running, beyond which 429")
    decode_workers: int = Field(description="decode threads of each process that answers HTTP")
    decode_nice: int = Field(description="how much nicer the decode threads run than the rest (0: the same)")
    decode_memory_mb: float = Field(
        description="MiB the images decoding in each process's pool may hold at once, by their estimate"
    )
    frontends: int = Field(description="processes answering HTTP, all feeding one batcher")
    call_cost_tokens: dict[str, float | None] = Field(
        description=(
            "per text kind, one more forward call's cost in padded tokens, measured at startup or set:"
            " a batch of mixed text lengths runs as several calls when that saves more (null: never)"
        )
    )
    inline_decode_bytes: int = Field(description="largest body decoded on the event loop when alone in the server")
    inline_decode_pixels: int = Field(description="most pixels of an image decoded on the event loop")
    inline_decode_under_load: bool = Field(
        description="the inline limits apply under load too, not only to a request alone in the server"
    )
    request_timeout_ms: int = Field(description="default deadline (X-Request-Timeout-Ms overrides it)")
    max_request_timeout_ms: int


class LimitsInfo(BaseModel):
    max_body_bytes: int
    body_memory_mb: int = Field(description="MiB of request bodies held at once (read, not yet decoded)")
    max_image_bytes: int
    max_text_bytes: int
    max_parts: int
    max_image_pixels: int
    max_image_side: int
    max_image_aspect: float
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    forward_timeout_s: float


class InfoResponse(BaseModel):
    model: ModelInfo
    device: str
    threads: int = Field(description="intra-op threads of the inference thread")
    switch_interval_ms: float = Field(description="the Python thread switch interval in force (--switch-interval-ms)")
    precision: Precision = Field(description="fp32, or the autocast precision of every forward pass (bf16, fp16)")
    graph_optimized: bool = Field(
        description="the module serves frozen and optimized for inference (--optimize-graph; CPU at fp32 only)"
    )
    batching: BatchingInfo
    limits: LimitsInfo


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. missing_field, text_too_long, overloaded")
    message: str = Field(description="what went wrong, for a person; never echoes the input")
    request_id: str = Field(description="the X-Request-ID of the request")


class ErrorResponse(BaseModel):
    error: ErrorBody


_ERROR_MEANINGS = {
    400: "Malformed request: the body is not valid multipart/form-data",
    401: "API keys are on and the request has no valid one (Authorization: Bearer KEY, or X-API-Key)",
    408: "The body did not arrive within body_timeout_s (the connection is closed)",
    413: "Too large: the body (Content-Length or streamed), an image part, or the number of parts",
    415: "Not multipart/form-data, or an image that is not JPEG, PNG, WebP, BMP or GIF",
    422: "Invalid field: missing, empty, too long (never truncated), bad top_k, bad X-Request-Timeout-Ms, "
    "or an image that is corrupt or has unusable dimensions",
    429: "Over the admission limit (the queue is full); retry after Retry-After seconds",
    500: "The model failed on this request, ran out of device memory on it even alone (code out_of_memory;"
    " batches are split and retried first), or did not finish within forward_timeout_s (other requests in its"
    " batch are unaffected)",
    503: "Not ready (loading, warming up, failed, or the model hung); retry after Retry-After seconds",
    504: "The deadline (X-Request-Timeout-Ms, or the server default) passed before the request ran",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _ERROR_MEANINGS[status]} for status in statuses}


def multipart_body(properties: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    """An OpenAPI requestBody for a multipart/form-data form (the routes parse it themselves)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": properties, "required": required},
                }
            },
        },
        "parameters": [
            {
                "name": "X-Request-Timeout-Ms",
                "in": "header",
                "required": False,
                "schema": {"type": "integer", "minimum": 1},
                "description": "deadline in milliseconds from arrival; a request still queued at its deadline "
                "is never run and gets 504 (default: the server's request_timeout_ms)",
            },
            {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": 200, "pattern": "^[!-~]+$"},
                "description": "echoed on the response; generated when absent or not of this form",
            },
        ],
    }


IMAGE_FIELD = {
    "type": "string",
    "format": "binary",
    "description": "the image: JPEG, PNG, WebP, BMP or GIF (first frame); EXIF orientation applied; "
    "resized to the model's input size",
}
# Not blank, and no control character but tab, line feed and carriage return (app.decoding).
_CONTROL = "\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f"
TEXT_FIELD = {
    "type": "string",
    "minLength": 1,
    "pattern": f"^[^{_CONTROL}]*[^\\s{_CONTROL}][^{_CONTROL}]*$",
    "description": "UTF-8 text (a charset parameter, if any, must say so); NFC-normalized; at most the model's "
    "max_text_length bytes (longer: 422, never truncated); not blank; no control characters but tab, line feed "
    "and carriage return",
}
TOP_K_FIELD = {
    "type": "integer",
    "minimum": 1,
    "description": "how many labels to return in top_k (default 5, at most the number of labels)",
}
