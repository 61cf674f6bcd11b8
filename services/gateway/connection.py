"""Long-lived multiplexed streams to the tokenizer and engine services.

Each peer gets one bidirectional stream per RPC that carries every request of
the gateway. Outgoing messages queued while the previous write was in flight
are merged into one (protobuf `MergeFrom` concatenates the repeated fields of
these batch messages), so a burst of requests costs one write. When a stream
breaks, the owner fails the requests that rode on it and reconnects with
exponential backoff.
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

log = get_logger("gateway")

M = TypeVar("M", bound=Message)


class OutgoingStream(Generic[M]):
    """The request side of one open bidi stream."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[M | None] = asyncio.Queue()

    def send(self, message: M) -> None:
        self._queue.put_nowait(message)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def messages(self) -> AsyncIterator[M]:
        while True:
            merged = await self._queue.get()
            if merged is None:
                return
            while not self._queue.empty():
                following = self._queue.get_nowait()
                if following is None:
                    yield merged
                    return
                merged.MergeFrom(following)
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
