"""Per-request failures without a transport: a refusal kind and a message a
person can act on. The engine core and the tokenizer raise these; each
transport maps the kind to its own codes in one table (gRPC status codes in
grpc_utils.GRPC_CODES, HTTP statuses in the gateway's REST errors)."""

from __future__ import annotations

import enum


class Refusal(enum.Enum):
    """Why a request failed; the names match the gRPC status codes they map to."""

    INVALID_ARGUMENT = "invalid_argument"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    UNAUTHENTICATED = "unauthenticated"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    UNKNOWN = "unknown"


class RequestError(Exception):
    """A request-level failure: its kind, a message for the caller, and the
    request field at fault when one is (the REST shim reports it as `param`)."""

    def __init__(self, kind: Refusal, message: str, field: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field

    def __reduce__(self) -> tuple[type[RequestError], tuple[Refusal, str, str | None]]:
        # Requests cross into the engine core's process with their errors.
        return RequestError, (self.kind, self.message, self.field)


class DuplicateRequestError(RequestError):
    """A request id already live on the stream: the new request is refused
    and the live one it names goes on, so the refusal does not end it (the
    engine's and the tokenizer's multiplexed streams alike)."""

    def __init__(self, message: str):
        super().__init__(Refusal.INVALID_ARGUMENT, message)

    def __reduce__(self) -> tuple[type[DuplicateRequestError], tuple[str]]:  # type: ignore[override]
        return DuplicateRequestError, (self.message,)


def invalid_argument(message: str, field: str | None = None) -> RequestError:
    return RequestError(Refusal.INVALID_ARGUMENT, message, field)
