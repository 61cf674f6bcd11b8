"""The bodies of one OpenAI-style response: its envelope (id, object,
created, model, usage) around the choices, and for a streamed response its
server-sent events.

A streamed response is mostly chunks of text alone, one per engine step, so
their event is serialized once per request: the JSON of the envelope around
a choice whose text is a placeholder, split at the placeholder into bytes
before and after it. Each such chunk's event is then those bytes around the
JSON of its text, which is what serializing the whole event would give. A
chunk with anything else (logprobs, a finish reason) is serialized whole."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagewire.services.gateway.openai_schemas import CompletionFormat, usage_body
from pagewire.v1 import common_pb2, gateway_pb2

DONE = b"data: [DONE]\n\n"
# Text no model emits; its JSON appears once in the event built around it.
PLACEHOLDER = "\x00pagewire-text\x00"


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


@dataclass(frozen=True)
class Envelope:
    """What every body of one response shares."""

    output: CompletionFormat
    created: int
    model: str
    # Streamed events carry "usage": null until the last (stream_options.include_usage).
    include_usage: bool

    def body(self, choices: list[dict[str, Any]], streaming: bool, usage: common_pb2.Usage | None = None) -> dict[str, Any]:
        output = self.output
        body = {"id": output.id, "object": output.chunk_object_name if streaming else output.object_name, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage_body(usage)
        elif streaming and self.include_usage:
            body["usage"] = None
        return body


class StreamEvents:
    """The server-sent events of one streamed response."""

    def __init__(self, envelope: Envelope):
        self._envelope = envelope
        # Built at its first use: only then is choice 0's echo (if any) sent.
        self._text_event: list[bytes] | None = None

    def opening(self) -> bytes:
        """The events before the first chunk (chat's assistant role)."""
        opening = self._envelope.output.opening()
        return event(self._envelope.body(opening, True)) if opening else b""

    def chunk(self, chunk: gateway_pb2.GenerateChunk) -> bytes:
        """The chunk's event, and the usage event after the last chunk."""
        plain = chunk.text and not chunk.logprobs and not chunk.finish_reason
        if plain and self._envelope.output.text_as_is(chunk.index):
            if self._text_event is None:
                text_only = self._envelope.body([self._envelope.output.choice(gateway_pb2.GenerateChunk(text=PLACEHOLDER), streaming=True)], True)
                self._text_event = event(text_only).split(json.dumps(PLACEHOLDER).encode())
            before, after = self._text_event
            return before + json.dumps(chunk.text).encode() + after
        events = event(self._envelope.body([self._envelope.output.choice(chunk, streaming=True)], True))
        # With several choices only the request's last chunk has usage (choices.py).
        if chunk.HasField("usage") and self._envelope.include_usage:
            events += event(self._envelope.body([], True, chunk.usage))
        return events
