"""Domain errors, and the one table from error to HTTP status.

    ServiceError                 code (machine-readable)            status
     ├── MalformedRequest        malformed_request, ...             400  the body is not valid multipart/form-data
     ├── Unauthorized            unauthorized, invalid_api_key      401  API keys are on and none valid was sent
     │                                                                   (WWW-Authenticate)
     ├── RequestTimeout          body_timeout                       408  the body did not arrive within
     │                                                                   body_timeout_s (the connection is closed)
     ├── PayloadTooLarge         payload_too_large, ...             413  body, image part or part count over a limit
     │    │                                                              (the connection is closed)
     │    └── DecodeTooLarge     image_too_large                    413  decoding the image would take more than
     │                                                                   --decode-memory-mb (the body was read whole)
     ├── UnsupportedMediaType    unsupported_media_type, ...        415  not multipart/form-data, or an image format
     │                                                                   outside the allowlist
     ├── InvalidInput            missing_field, empty_text, ...     422  a field missing, empty, too long, or unusable
     ├── Overloaded              overloaded                         429  admission limit reached (Retry-After)
     ├── ModelFailure            model_failure, model_timeout       500  the model failed (or hung) on this item, and
     │    │                                                              only on the items it touched
     │    └── InsufficientStorage out_of_memory                     500  out of device memory even alone (a batch
     │                                                                   that runs out is split and retried first)
     ├── NotReady                not_ready                          503  loading, failed, hung or no inference worker
     │                                                                   (Retry-After)
     ├── DeadlineExceeded        deadline_exceeded                  504  the deadline passed before the request ran
     └── ClientGone              client_disconnected                499  the client left before its request ran; the
                                                                         answer is never read, only counted

The engine, the batcher and the decoders raise these; `app.handlers` turns them into the one JSON
shape. Messages are written for clients: they never carry a traceback or echo the input back.
Below the app, the HTTP protocol (`app.protocol`) answers 431 headers_too_large and 408
header_timeout in the same shape, for requests that never reach it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final


class ServiceError(Exception):
    default_code: ClassVar[str] = "internal_error"
    # Answer with `Connection: close`: the rest of the request body is never read, so the
    # connection cannot carry another request.
    closes_connection: ClassVar[bool] = False
    # A refusal the client should try again (429, 503) always says when, so that a client or a
    # load balancer backs off by the server's word rather than retrying at once.
    default_retry_after_s: ClassVar[int | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after_s: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.retry_after_s = retry_after_s if retry_after_s is not None else self.default_retry_after_s
        self.headers = dict(headers or {})


class MalformedRequest(ServiceError):
    default_code = "malformed_request"


class Unauthorized(ServiceError):
    default_code = "unauthorized"


class RequestTimeout(ServiceError):
    default_code = "body_timeout"
    closes_connection = True


class PayloadTooLarge(ServiceError):
    default_code = "payload_too_large"
    closes_connection = True


class DecodeTooLarge(PayloadTooLarge):
    """An image that would take more decode memory than the server allows: its body was read
    whole, so the connection can carry the next request."""

    default_code = "image_too_large"
    closes_connection = False


class UnsupportedMediaType(ServiceError):
    default_code = "unsupported_media_type"


class InvalidInput(ServiceError):
    default_code = "invalid_field"


class Overloaded(ServiceError):
    default_code = "overloaded"
    default_retry_after_s = 1


class ModelFailure(ServiceError):
    default_code = "model_failure"


class InsufficientStorage(ModelFailure):
    default_code = "out_of_memory"


class NotReady(ServiceError):
    default_code = "not_ready"
    default_retry_after_s = 1


class DeadlineExceeded(ServiceError):
    default_code = "deadline_exceeded"


class ClientGone(ServiceError):
    default_code = "client_disconnected"


CLIENT_CLOSED_REQUEST: Final = 499  # nginx's convention; no client ever reads it

STATUS: Final[dict[type[ServiceError], int]] = {
    MalformedRequest: 400,
    Unauthorized: 401,
    RequestTimeout: 408,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidInput: 422,
    Overloaded: 429,
    ModelFailure: 500,  # its subclass too: out of memory is a failure inside the model (DESIGN.md)
    NotReady: 503,
    DeadlineExceeded: 504,
    ClientGone: CLIENT_CLOSED_REQUEST,
}


def status_of(error: ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500
