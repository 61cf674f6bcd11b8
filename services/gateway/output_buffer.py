"""Backpressure: one request's output that its client has not read yet.

A chunk is unread from the moment the request hands it to its client's
transport (the Generate stream's writer, the REST response, Complete) until
that transport has taken it, which happens only as fast as the client
reads. A request whose unread output outgrows its bound, or whose oldest
unread chunk has waited past the read timeout, is failed, which aborts it in
the engine: a client that stops reading holds neither gateway memory nor KV
blocks for long."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.rpc import status_pb2

from pagewire.services.common.grpc_utils import error_status
from pagewire.services.common.limits import DEFAULT_CLIENT_READ_TIMEOUT_S, DEFAULT_MAX_BUFFERED_OUTPUT_BYTES


@dataclass(frozen=True)
class OutputLimits:
    max_unread_bytes: int = DEFAULT_MAX_BUFFERED_OUTPUT_BYTES
    read_timeout_s: float = DEFAULT_CLIENT_READ_TIMEOUT_S


class UnreadOutput:
    """The chunks of one request handed out and not yet taken, in order."""

    def __init__(self, limits: OutputLimits, on_stalled: Callable[[status_pb2.Status], None]):
        self._limits = limits
        self._on_stalled = on_stalled
        # (handed out at, bytes), oldest first: a request's chunks are taken in order.
        self._waiting: deque[tuple[float, int]] = deque()
        self._bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    def overflow(self, size: int) -> status_pb2.Status | None:
        """Why a chunk of `size` bytes more would be too much; None when it fits."""
        if self._bytes + size <= self._limits.max_unread_bytes:
            return None
        return error_status(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the client has not read {self._bytes + size} bytes of this request's output, more than the "
            f"{self._limits.max_unread_bytes} a request may have waiting (--max-buffered-output-bytes): the request is aborted; read its stream as it comes",
        )

    def handed_out(self, size: int) -> None:
        loop = asyncio.get_running_loop()
        self._waiting.append((loop.time(), size))
        self._bytes += size
        if self._timer is None:
            self._timer = loop.call_at(self._waiting[0][0] + self._limits.read_timeout_s, self._check)

    def taken(self) -> None:
        """The client's transport took the oldest chunk."""
        if self._waiting:
            self._bytes -= self._waiting.popleft()[1]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        # Armed for the oldest chunk of its time, it may find that one taken
        # and a younger one oldest: then it waits for that one's turn.
        self._timer = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        due = self._waiting[0][0] + self._limits.read_timeout_s
        if due > loop.time():
            self._timer = loop.call_at(due, self._check)
            return
        self._on_stalled(
            error_status(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the client has read none of this request's output for {self._limits.read_timeout_s:g} s (--client-read-timeout-s): the request is aborted",
            )
        )
