"""Long-lived multiplexed streams to the tokenizer and engine services.

Each peer gets one bidirectional stream per RPC that carries every request of
the gateway. Outgoing messages queued while the previous write was in flight
are merged (protobuf `MergeFrom` concatenates the repeated fields of these
batch messages) while the result fits in --max-message-bytes, so a burst of
requests costs few writes and no message is too large for the peer. When a
stream breaks, the owner fails the requests that rode on it and reconnects
with exponential backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagewire.services.common.logging import get_logger
from pagewire.services.common.message_size import split_batch

log = get_logger("gateway")

M = TypeVar("M", bound=Message)


class OutgoingStream(Generic[M]):
    """The request side of one open bidi stream. Its messages are batches
    (repeated fields only), merged while they fit in max_bytes, and a batch
    larger than that is split: no message outgrows what the peer accepts,
    which would end the stream for every request on it."""

    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes
        self._queue: asyncio.Queue[tuple[M, int] | None] = asyncio.Queue()

    def send(self, message: M) -> None:
        """Queue `message`; RequestError (INVALID_ARGUMENT), with nothing
        queued, when one of its entries does not fit in a message alone."""
        size = message.ByteSize()
        pieces = [message] if size <= self._max_bytes else split_batch(message, self._max_bytes)
        for piece in pieces:
            self._queue.put_nowait((piece, piece.ByteSize()))

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def messages(self) -> AsyncIterator[M]:
        # Taken from the queue, but too large to join the message before it.
        held: tuple[M, int] | None = None
        while True:
            first, held = held or await self._queue.get(), None
            if first is None:
                return
            merged, size = first
            while not self._queue.empty():
                following = self._queue.get_nowait()
                if following is None:
                    yield merged
                    return
                if size + following[1] > self._max_bytes:
                    held = following
                    break
                # The encodings of batches concatenate, so sizes add up.
                merged.MergeFrom(following[0])
                size += following[1]
            yield merged


@dataclass(frozen=True)
class Backoff:
    initial_s: float
    max_s: float


async def keep_connected(peer: str, session: Callable[[], Awaitable[None]], backoff: Backoff) -> None:
    """Run `session` (connect, then serve until the stream ends) forever,
    waiting between attempts. The delay resets once a session has run longer
    than the longest delay, so a peer that was up a while is retried quickly."""
    loop = asyncio.get_running_loop()
    delay = backoff.initial_s
    while True:
        started = loop.time()
        try:
            await session()
            reason = "stream closed by the peer"
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        if loop.time() - started > backoff.max_s:
            delay = backoff.initial_s
        log.warning("peer unavailable, reconnecting", peer=peer, reason=reason, retry_in_s=round(delay, 2))
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff.max_s)


async def until_serving(channel: grpc.aio.Channel, service: str) -> grpc.aio.UnaryStreamCall | None:
    """Watch `service`'s grpc.health.v1 status, waiting for the peer to come
    up at all, until it reports SERVING; then return the watch, which goes on
    reporting changes. None when the peer ended the watch first.

    A watch hears of readiness the moment the peer flips it, where polling
    would leave a loaded peer idle until the next attempt."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), wait_for_ready=True)
    while True:
        reply = await watch.read()
        if reply is grpc.aio.EOF:
            return None
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return watch
