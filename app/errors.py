"""Domain errors, and the one table from error to HTTP status.

    ServiceError                 code (machine-readable)            status
     ├── MalformedRequest        malformed_request, ...             400  the body is not valid multipart/form-data
     ├── PayloadTooLarge         payload_too_large, ...             413  body, image part or part count over a limit
     ├── UnsupportedMediaType    unsupported_media_type, ...        415  not multipart/form-data, or an image format
     │                                                                   outside the allowlist
     ├── InvalidInput            missing_field, empty_text, ...     422  a field missing, empty, too long, or unusable
     ├── Overloaded              overloaded                         429  admission limit reached (Retry-After)
     ├── ModelFailure            model_failure                      500  the model failed on this item (only this one)
     ├── NotReady                not_ready                          503  loading, failed or no inference worker
     │                                                                   (Retry-After)
     ├── DeadlineExceeded        deadline_exceeded                  504  the deadline passed before the request ran
     └── ClientGone              client_disconnected                499  the client left before its request ran; the
                                                                         answer is never read, only counted

The engine, the batcher and the decoders raise these; `app.handlers` turns them into the one JSON
shape. Messages are written for clients: they never carry a traceback or echo the input back.
"""

from __future__ import annotations

from typing import ClassVar, Final


class ServiceError(Exception):
    default_code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.retry_after_s = retry_after_s


class MalformedRequest(ServiceError):
    default_code = "malformed_request"


class PayloadTooLarge(ServiceError):
    default_code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    default_code = "unsupported_media_type"


class InvalidInput(ServiceError):
    default_code = "invalid_field"


class Overloaded(ServiceError):
    default_code = "overloaded"


class ModelFailure(ServiceError):
    default_code = "model_failure"


class NotReady(ServiceError):
    default_code = "not_ready"


class DeadlineExceeded(ServiceError):
    default_code = "deadline_exceeded"


class ClientGone(ServiceError):
    default_code = "client_disconnected"


CLIENT_CLOSED_REQUEST: Final = 499  # nginx's convention; no client ever reads it

STATUS: Final[dict[type[ServiceError], int]] = {
    MalformedRequest: 400,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidInput: 422,
    Overloaded: 429,
    ModelFailure: 500,
    NotReady: 503,
    DeadlineExceeded: 504,
    ClientGone: CLIENT_CLOSED_REQUEST,
}


def status_of(error: ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500
