"""Optional API keys on the public ports.

gRPC callers send the metadata `authorization: Bearer KEY`; REST callers send
the header `Authorization: Bearer KEY`. Health checks (and gRPC reflection,
which only describes the API) stay open so that load balancers and
orchestrators need no key. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from pagewire.services.common.logging import get_logger

# Shared by the services: each line names the service of the process.
log = get_logger()

BEARER_PREFIX = "bearer "
AUTHORIZATION = "authorization"

# Services a caller may use without a key: liveness/readiness probes and the
# schema of the API (no data, no compute).
OPEN_GRPC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
# REST paths open without a key: probes and the Prometheus scrape.
OPEN_HTTP_PATHS = frozenset({"/health", "/healthz", "/ready", "/readyz", "/metrics"})

UNAUTHENTICATED_MESSAGE = "a valid API key is required: send 'Authorization: Bearer <key>'"


def bearer_key_matches(authorization: str | None, api_key: str) -> bool:
    """True when `authorization` is `Bearer <api_key>` (scheme case-insensitive)."""
    if not authorization or not authorization[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
        return False
    presented = authorization[len(BEARER_PREFIX) :].strip()
    return hmac.compare_digest(presented.encode(), api_key.encode())


def _service_of(method: str) -> str:
    """'pagewire.v1.Generation' of '/pagewire.v1.Generation/Generate'."""
    return method.lstrip("/").split("/", 1)[0]


def _refusing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with
    UNAUTHENTICATED before reading any request."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def refuse_streaming(_request: Any, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # makes this an async generator, the shape of a streaming-response handler

    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_streaming, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_streaming, **codec)
    return grpc.unary_unary_rpc_method_handler(refuse, **codec)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <api_key>` metadata with
    UNAUTHENTICATED, except to the services in OPEN_GRPC_SERVICES."""

    def __init__(self, api_key: str):
        if not api_key:
            raise ValueError("an empty API key would refuse every caller; leave the interceptor out instead")
        self._api_key = api_key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or _service_of(handler_call_details.method) in OPEN_GRPC_SERVICES:
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        authorization = next((value for key, value in metadata if key == AUTHORIZATION), None)
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        if bearer_key_matches(authorization, self._api_key):
            return handler
        log.warning("unauthenticated call refused", method=handler_call_details.method, key_sent=authorization is not None)
        return _refusing_handler(handler)


def grpc_interceptors(api_key: str) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a public gRPC server needs for `api_key` (none when empty)."""
    return [ApiKeyInterceptor(api_key)] if api_key else []


ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


class ApiKeyMiddleware:
    """ASGI middleware: 401 with an OpenAI error body unless the request
    carries `Authorization: Bearer <api_key>`; paths in `open_paths` pass.
    Plain ASGI (not Starlette's BaseHTTPMiddleware) so streamed responses
    pass through untouched."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str] = OPEN_HTTP_PATHS):
        if not api_key:
            raise ValueError("an empty API key would refuse every caller; leave the middleware out instead")
        self.app = app
        self._api_key = api_key
        self._open_paths = open_paths

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") in self._open_paths:
            await self.app(scope, receive, send)
            return
        authorization = next((value.decode("latin-1") for key, value in scope["headers"] if key == b"authorization"), None)
        if bearer_key_matches(authorization, self._api_key):
            await self.app(scope, receive, send)
            return
        log.warning("unauthenticated request refused", path=scope["path"], key_sent=authorization is not None)
        # The REST shim's error body: OpenAI's shape, `code` the gRPC status name.
        message = "incorrect API key provided" if authorization else UNAUTHENTICATED_MESSAGE
        payload = json.dumps({"error": {"message": message, "type": "authentication_error", "param": None, "code": "UNAUTHENTICATED"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), (b"www-authenticate", b"Bearer")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
