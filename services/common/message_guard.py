"""Bytes that do not parse as the method's request message are the caller's
fault: answer INVALID_ARGUMENT. Left alone, grpc.aio reports the DecodeError
as UNKNOWN, which reads like a server failure."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from pagewire.services.common.logging import get_logger

# Shared by the services: each line names the service of the process.
log = get_logger()


class _Malformed:
    """Stands in for a request message that failed to parse."""

    def __init__(self, error: DecodeError):
        self.message = f"the request message could not be parsed: {error}"


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:
            return _Malformed(exc)

    return deserialize


async def _refuse(context: grpc.aio.ServicerContext, malformed: _Malformed, method: str) -> None:
    log.warning("malformed request message refused", method=method, error=malformed.message)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, malformed.message)


# Handler factories by (request streaming, response streaming).
_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _guarded(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with parse failures answered INVALID_ARGUMENT."""
    behavior = _behavior(handler)

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Malformed):
                await _refuse(context, request, method)
            yield request

    async def prepare(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if handler.request_streaming:
            return checked(request, context)
        if isinstance(request, _Malformed):
            await _refuse(context, request, method)
        return request

    # grpc.aio tells handler kinds apart by function type, so keep the original's.
    if inspect.isasyncgenfunction(behavior):

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in behavior(await prepare(request, context), context):
                yield response

    else:

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
            return await behavior(await prepare(request, context), context)

    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(wrapped, request_deserializer=_tolerant(handler.request_deserializer), response_serializer=handler.response_serializer)


def _guarded_sync(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler`, synchronous, with parse failures answered INVALID_ARGUMENT.
    It runs on a thread of the server's pool and may read its input from
    another thread, so a malformed message of a stream ends the input there:
    the handler answers what came before it, then the RPC ends."""
    behavior = _behavior(handler)

    def run(request: Any, context: grpc.ServicerContext) -> tuple[Any, list[_Malformed]]:
        malformed: list[_Malformed] = []

        def checked(requests: Iterator[Any]) -> Iterator[Any]:
            for message in requests:
                if isinstance(message, _Malformed):
                    malformed.append(message)
                    return
                yield message

        if handler.request_streaming:
            return behavior(checked(request), context), malformed
        if isinstance(request, _Malformed):
            _refuse_sync(context, request, method)
        return behavior(request, context), malformed

    if handler.response_streaming:

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            responses, malformed = run(request, context)
            yield from responses
            if malformed:
                _refuse_sync(context, malformed[0], method)

    else:

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:  # type: ignore[misc]
            response, malformed = run(request, context)
            if malformed:
                _refuse_sync(context, malformed[0], method)
            return response

    return _FACTORIES[(handler.request_streaming, handler.response_streaming)](
        wrapped, request_deserializer=_tolerant(handler.request_deserializer), response_serializer=handler.response_serializer
    )


def _refuse_sync(context: grpc.ServicerContext, malformed: _Malformed, method: str) -> None:
    log.warning("malformed request message refused", method=method, error=malformed.message)
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, malformed.message)


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def _is_async(handler: grpc.RpcMethodHandler) -> bool:
    behavior = _behavior(handler)
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


class MalformedMessageInterceptor(grpc.aio.ServerInterceptor):
    """Applies to asyncio handlers and to synchronous ones (run on the
    server's thread pool), each kept in its own execution model."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        guard = _guarded if _is_async(handler) else _guarded_sync
        return guard(handler, handler_call_details.method)
