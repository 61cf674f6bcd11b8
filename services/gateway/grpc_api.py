"""The public gRPC API (pagewire.v1.Generation) over the gateway's requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import grpc
from grpc_status import rpc_status

from pagewire.services.common.grpc_utils import error_status
from pagewire.services.common.message_size import packed
from pagewire.services.gateway.choices import ChoiceGroup
from pagewire.services.gateway.hub import Gateway
from pagewire.services.gateway.request import GatewayRequest
from pagewire.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def _refusal(request_id: str, message: str, ends: bool = True) -> gateway_pb2.GenerateChunk:
    """The refusal of a Start. A duplicate id does not end the live request
    of that id, so its refusal carries no finish reason: the live request's
    own last chunk is still to come."""
    return gateway_pb2.GenerateChunk(
        request_id=request_id,
        finish_reason=common_pb2.FINISH_REASON_ERROR if ends else common_pb2.FINISH_REASON_UNSPECIFIED,
        error=error_status(grpc.StatusCode.INVALID_ARGUMENT, message),
    )


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A chunk waiting for the Generate stream's writer, and the request it
    tells of taking it (none for a refused Start)."""

    chunk: gateway_pb2.GenerateChunk
    request: GatewayRequest | ChoiceGroup | None = None


class GenerationServicer(gateway_pb2_grpc.GenerationServicer):
    def __init__(self, gateway: Gateway, max_message_bytes: int):
        self.gateway = gateway
        self.max_message_bytes = max_message_bytes

    async def Generate(
        self, request_iterator: AsyncIterator[gateway_pb2.ClientMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.ServerMessage]:
        # Chunks of every request, sent together in the writer's next messages.
        pending: list[Outgoing] = []
        ready = asyncio.Event()
        all_done = False
        live: dict[str, tuple[GatewayRequest | ChoiceGroup, asyncio.Task[None]]] = {}

        def send(chunk: gateway_pb2.GenerateChunk, request: GatewayRequest | ChoiceGroup | None = None) -> None:
            pending.append(Outgoing(chunk, request))
            ready.set()

        async def follow(request: GatewayRequest | ChoiceGroup) -> None:
            try:
                await request.run(lambda chunk: send(chunk, request))
            finally:
                live.pop(request.id, None)

        async def read() -> None:
            async for message in request_iterator:
                if message.HasField("cancel"):
                    entry = live.get(message.cancel.request_id)
                    if entry is not None:
                        entry[0].cancel()
                    continue
                start = message.start
                if not start.request_id:
                    send(_refusal("", "request_id is required on the Generate stream"))
                elif start.request_id in live:
                    send(_refusal(start.request_id, f"request_id {start.request_id!r} is already in flight on this stream", ends=False))
                else:
                    request = self.gateway.request(start)
                    live[start.request_id] = (request, asyncio.create_task(follow(request)))
            # The client half-closed: finish what is in flight, then end.
            await asyncio.gather(*(task for _, task in list(live.values())), return_exceptions=True)
            nonlocal all_done
            all_done = True
            ready.set()

        reader = asyncio.create_task(read())
        try:
            # all_done is set after every request's last chunk went to pending.
            while not (all_done and not pending):
                await ready.wait()
                ready.clear()
                waiting = pending.copy()
                pending.clear()
                # As many messages as the limit asks for; each is taken (yield
                # returns) only as fast as the client reads.
                sent = 0
                for chunks in packed((entry.chunk for entry in waiting), self.max_message_bytes):
                    yield gateway_pb2.ServerMessage(chunks=chunks)
                    for entry in waiting[sent : sent + len(chunks)]:
                        if entry.request is not None:
                            entry.request.taken()
                    sent += len(chunks)
            reader.result()
        finally:
            # The client went away (or the stream failed): end its requests,
            # which aborts them in the engine.
            reader.cancel()
            for _, task in list(live.values()):
                task.cancel()

    async def Complete(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        async with aclosing(self.gateway.request(request).chunks()) as chunks:
            async for chunk in chunks:
                if chunk.error.code:
                    await context.abort_with_status(rpc_status.to_status(chunk.error))
                yield chunk

    async def ListModels(self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.ModelList:
        await self.gateway.refresh_models()  # adapters loaded through another worker or at the engine
        return gateway_pb2.ModelList(models=self.gateway.models())
