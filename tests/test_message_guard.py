"""Bytes that are not the method's request message get INVALID_ARGUMENT, on
every kind of handler, asyncio or synchronous (run on the server's thread
pool, as the tokenizer's are), and the server goes on serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from pagewire.services.common.grpc_utils import start_server
from pagewire.v1 import gateway_pb2, gateway_pb2_grpc

CORRUPT = [b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x1a\x05ab"]


class _Generation(gateway_pb2_grpc.GenerationServicer):
    """An async generator (Complete, Generate) and a coroutine (ListModels) handler."""

    async def Complete(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        yield gateway_pb2.GenerateChunk(text=request.text)

    async def Generate(self, requests: AsyncIterator[gateway_pb2.ClientMessage], context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.ServerMessage]:
        async for message in requests:
            yield gateway_pb2.ServerMessage(chunks=[gateway_pb2.GenerateChunk(request_id=message.start.request_id)])

    async def ListModels(self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.ModelList:
        return gateway_pb2.ModelList(models=[gateway_pb2.ModelCard(id="m")])


class _SyncGeneration(gateway_pb2_grpc.GenerationServicer):
    """The same handlers, synchronous; Generate answers each message it read
    before a malformed one."""

    def Complete(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext) -> Iterator[gateway_pb2.GenerateChunk]:
        yield gateway_pb2.GenerateChunk(text=request.text)

    def Generate(self, requests: Iterator[gateway_pb2.ClientMessage], context: grpc.ServicerContext) -> Iterator[gateway_pb2.ServerMessage]:
        for message in requests:
            yield gateway_pb2.ServerMessage(chunks=[gateway_pb2.GenerateChunk(request_id=message.start.request_id)])

    def ListModels(self, request: gateway_pb2.ListModelsRequest, context: grpc.ServicerContext) -> gateway_pb2.ModelList:
        return gateway_pb2.ModelList(models=[gateway_pb2.ModelCard(id="m")])


async def _codes(raw: bytes, channel: grpc.aio.Channel) -> list[grpc.StatusCode]:
    codes = []
    try:
        async for _ in channel.unary_stream("/pagewire.v1.Generation/Complete")(raw, timeout=5):
            pass
        codes.append(grpc.StatusCode.OK)
    except grpc.aio.AioRpcError as exc:
        codes.append(exc.code())
    # A well-formed message first: it is answered, then the stream ends INVALID_ARGUMENT.
    call = channel.stream_stream("/pagewire.v1.Generation/Generate", response_deserializer=gateway_pb2.ServerMessage.FromString)(timeout=5)
    answered = []
    try:
        await call.write(gateway_pb2.ClientMessage(start=gateway_pb2.GenerateRequest(request_id="before")).SerializeToString())
        answered.append((await call.read()).chunks[0].request_id)
        await call.write(raw)
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
        codes.append(grpc.StatusCode.OK)
    except grpc.aio.AioRpcError as exc:
        codes.append(exc.code())
    assert answered == ["before"]
    try:
        await channel.unary_unary("/pagewire.v1.Generation/ListModels")(b"\xff", timeout=5)
        codes.append(grpc.StatusCode.OK)
    except grpc.aio.AioRpcError as exc:
        codes.append(exc.code())
    return codes


async def _session(servicer: gateway_pb2_grpc.GenerationServicer) -> tuple[list[list[grpc.StatusCode]], str, str]:
    register = [lambda s: gateway_pb2_grpc.add_GenerationServicer_to_server(servicer, s)]
    running = await start_server("127.0.0.1", 0, 1 << 20, register, [], handler_threads=4)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            codes = [await _codes(raw, channel) for raw in CORRUPT]
            stub = gateway_pb2_grpc.GenerationStub(channel)
            echoed = [chunk.text async for chunk in stub.Complete(gateway_pb2.GenerateRequest(text="still here"), timeout=5)]
            models = await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
        return codes, "".join(echoed), models.models[0].id
    finally:
        await running.drain_and_stop(0)


@pytest.mark.parametrize("servicer", [_Generation(), _SyncGeneration()], ids=["asyncio", "synchronous"])
def test_corrupt_messages_are_invalid_argument_and_the_server_lives_on(servicer: gateway_pb2_grpc.GenerationServicer) -> None:
    codes, echoed, model = asyncio.run(_session(servicer))
    assert codes == [[grpc.StatusCode.INVALID_ARGUMENT] * 3] * len(CORRUPT)
    assert (echoed, model) == ("still here", "m")
