"""Clients of the multiplexed streams for the fuzz tests: each keeps one
stream open, writes what the test sends in order, and files every reply by
request id, so that a test can tell what happened to each item it sent and
whether the stream itself lived to the end."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import status_pb2

from pagewire.v1 import common_pb2, engine_pb2, gateway_pb2, tokenizer_pb2

CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(status: status_pb2.Status) -> grpc.StatusCode:
    return CODES.get(status.code, grpc.StatusCode.UNKNOWN)


@dataclass
class Event:
    """One reply about one request: an engine update, a gateway chunk or a text delta."""

    code: grpc.StatusCode
    message: str
    # The finish reason's name ("CLOSED" or "STOPPED" for a text delta), "" on a reply that ends nothing.
    finish: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""

    @property
    def refused_duplicate(self) -> bool:
        """The refusal of a second request under a live id: it ends nothing,
        since the live request goes on."""
        return self.code is not grpc.StatusCode.OK and self.finish == ""

    @property
    def final(self) -> bool:
        return self.finish != "" or self.refused_duplicate


@dataclass
class Outcome:
    """The events of one request, refused duplicates left out, folded."""

    code: grpc.StatusCode
    message: str
    finish: str
    token_ids: list[int]
    text: str
    # Events that ended the request: exactly one when it behaved.
    finals: int


def fold(events: Iterable[Event]) -> Outcome:
    own = [event for event in events if not event.refused_duplicate]
    errors = [event for event in own if event.code is not grpc.StatusCode.OK]
    return Outcome(
        code=errors[0].code if errors else grpc.StatusCode.OK,
        message=errors[0].message if errors else "",
        finish=next((event.finish for event in own if event.finish), ""),
        token_ids=[token for event in own for token in event.token_ids],
        text="".join(event.text for event in own),
        finals=sum(event.final for event in own),
    )


def _reason(finish_reason: int) -> str:
    return common_pb2.FinishReason.Name(finish_reason).removeprefix("FINISH_REASON_") if finish_reason else ""


def engine_events(step: engine_pb2.EngineStep) -> list[tuple[str, Event]]:
    return [(u.request_id, Event(status_code(u.error), u.error.message, _reason(u.finish_reason), list(u.token_ids))) for u in step.updates]


def gateway_events(message: gateway_pb2.ServerMessage) -> list[tuple[str, Event]]:
    return [(c.request_id, Event(status_code(c.error), c.error.message, _reason(c.finish_reason), list(c.token_ids), c.text)) for c in message.chunks]


def tokenized_events(batch: tokenizer_pb2.TokenizedBatch) -> list[tuple[str, Event]]:
    """A result ends its request: "CLOSED" with its ids, or "ERROR" with its refusal."""
    return [(r.request_id, Event(status_code(r.error), r.error.message, "ERROR" if r.error.code else "CLOSED", list(r.token_ids))) for r in batch.results]


def text_events(batch: tokenizer_pb2.TextBatch) -> list[tuple[str, Event]]:
    def finish(delta: tokenizer_pb2.TextDelta) -> str:
        return "STOPPED" if delta.stopped else "CLOSED" if delta.closed else ""

    return [(d.request_id, Event(status_code(d.error), d.error.message, finish(d), text=d.text)) for d in batch.deltas]


@dataclass
class StreamEnd:
    code: grpc.StatusCode
    details: str


class MultiplexedStream:
    """One bidirectional stream whose replies name their request (the
    engine's and the gateway's Generate, the tokenizer's Tokenize and
    Detokenize)."""

    def __init__(self, call: grpc.aio.StreamStreamCall, split: Callable[[Any], list[tuple[str, Event]]]):
        self.call = call
        self._split = split
        self.events: defaultdict[str, list[Event]] = defaultdict(list)
        self._finals: Counter[str] = Counter()
        self._changed = asyncio.Event()
        self.messages_received = 0
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.messages_received += 1
                for request_id, event in self._split(message):
                    self.events[request_id].append(event)
                    self._finals[request_id] += event.final
                self._changed.set()
        finally:
            self._changed.set()

    async def send(self, message: Any) -> None:
        await self.call.write(message)

    async def settle(self, expected: Counter[str], timeout_s: float) -> None:
        """Wait until each id has had as many final events as `expected`
        says; AssertionError when the stream ends first or time runs out."""
        try:
            async with asyncio.timeout(timeout_s):
                while missing := {rid: n for rid, n in expected.items() if self._finals[rid] < n}:
                    if self._reader.done():
                        raise AssertionError(f"the stream ended ({await self.end()}) with {len(missing)} requests unfinished: {_shown(missing)}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no end within {timeout_s} s for {_shown(missing)}") from None

    def outcome(self, request_id: str) -> Outcome:
        return fold(self.events.get(request_id, []))

    def duplicate_outcome(self, request_id: str) -> Outcome:
        """The refusals of second requests under `request_id`, folded."""
        refusals = [event for event in self.events.get(request_id, []) if event.refused_duplicate]
        first = refusals[0] if refusals else Event(grpc.StatusCode.OK, "", "")
        return Outcome(first.code, first.message, "", [], "", len(refusals))

    async def close(self) -> StreamEnd:
        """Half-close, read to the end, and say how the stream ended."""
        if not self._reader.done():
            await self.call.done_writing()
        await asyncio.gather(self._reader, return_exceptions=True)
        return await self.end()

    async def end(self) -> StreamEnd:
        return StreamEnd(await self.call.code(), await self.call.details() or "")


def _shown(ids: dict[str, int]) -> str:
    return ", ".join(repr(rid[:40]) for rid in list(ids)[:5])
