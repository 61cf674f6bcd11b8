"""A gateway Generate stream driven from a test's own thread."""

from __future__ import annotations

import queue
from collections.abc import Iterator

from pagewire.v1 import gateway_pb2, gateway_pb2_grpc


class BidiStream:
    """A Generate stream driven from the test thread: send, then read chunks."""

    def __init__(self, stub: gateway_pb2_grpc.GenerationStub, timeout_s: float = 120):
        self._outgoing: queue.Queue[gateway_pb2.ClientMessage | None] = queue.Queue()
        self.call = stub.Generate(iter(self._outgoing.get, None), timeout=timeout_s)

    def start(self, request: gateway_pb2.GenerateRequest) -> None:
        self._outgoing.put(gateway_pb2.ClientMessage(start=request))

    def cancel(self, request_id: str) -> None:
        self._outgoing.put(gateway_pb2.ClientMessage(cancel=gateway_pb2.Cancel(request_id=request_id)))

    def close(self) -> None:
        self._outgoing.put(None)

    def chunks(self) -> Iterator[gateway_pb2.GenerateChunk]:
        for message in self.call:
            yield from message.chunks
