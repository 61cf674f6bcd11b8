"""The streamed events built from a template once per request are the bytes
that serializing each whole event gives, and OpenAI's client parses them."""

from __future__ import annotations

import json

import openai.types
import openai.types.chat
import pytest

from pagewire.services.gateway.openai_schemas import ChatFormat, CompletionFormat
from pagewire.services.gateway.sse import Envelope, StreamEvents, event
from pagewire.v1 import common_pb2, gateway_pb2

TEXTS = ["Hello", " wörld", ' "quoted"\n', "\\ back\tslash", "😀 emoji", "</script>", "\u2028"]


def _chunks() -> list[gateway_pb2.GenerateChunk]:
    chunks = [gateway_pb2.GenerateChunk(text=text) for text in TEXTS]
    with_logprobs = gateway_pb2.GenerateChunk(text=" lp")
    with_logprobs.logprobs.add(token=" lp", token_id=5, logprob=-0.25).top_logprobs.add(token=" lp", token_id=5, logprob=-0.25)
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=9, cached_prompt_tokens=1)
    last = gateway_pb2.GenerateChunk(text="!", finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=usage)
    return [*chunks, with_logprobs, gateway_pb2.GenerateChunk(text=""), last]


def _whole_events(envelope: Envelope, chunk: gateway_pb2.GenerateChunk) -> bytes:
    """Each event serialized whole, as the REST shim did before its template."""
    events = event(envelope.body([envelope.output.choice(chunk, streaming=True)], True))
    if chunk.finish_reason and envelope.include_usage:
        events += event(envelope.body([], True, chunk.usage))
    return events


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("output_format", [CompletionFormat, ChatFormat])
def test_templated_events_equal_whole_events_and_parse_as_openai_chunks(output_format: type[CompletionFormat], include_usage: bool) -> None:
    envelope = Envelope(output_format(), 1700000000, "smollm2-135m", include_usage)
    # Each format keeps its own logprobs offsets: one for each way of building.
    reference = Envelope(output_format(), envelope.created, envelope.model, include_usage)
    object.__setattr__(reference.output, "id", envelope.output.id)
    stream = StreamEvents(envelope)
    for chunk in _chunks():
        assert stream.chunk(chunk) == _whole_events(reference, chunk)

    data = stream.opening() + b"".join(stream.chunk(chunk) for chunk in _chunks())
    events = [json.loads(line.removeprefix(b"data: ")) for line in data.split(b"\n\n") if line]
    if output_format is CompletionFormat:
        # The client builds streamed completions without validation (their
        # finish_reason is null until the last); chat chunks validate.
        parsed = [openai.types.Completion.construct(**body) for body in events]
        texts = [body.choices[0].text for body in parsed if body.choices]
    else:
        parsed = [openai.types.chat.ChatCompletionChunk.model_validate(body) for body in events]
        texts = [body.choices[0].delta.content or "" for body in parsed if body.choices]
    assert "".join(texts) == "".join(TEXTS) + " lp!"
    assert (parsed[-1].usage is not None) is include_usage


def test_echo_opens_each_choice_once_and_other_choices_are_serialized_whole() -> None:
    envelope = Envelope(CompletionFormat(4, ["Say", "Tell"]), 1700000000, "smollm2-135m", True)
    reference = Envelope(CompletionFormat(4, ["Say", "Tell"]), envelope.created, envelope.model, True)
    object.__setattr__(reference.output, "id", envelope.output.id)
    stream = StreamEvents(envelope)
    chunks = [gateway_pb2.GenerateChunk(text=text, index=index) for text in TEXTS[:3] for index in range(4)]
    texts: dict[int, str] = {}
    for chunk in chunks:
        data = stream.chunk(chunk)
        assert data == _whole_events(reference, chunk)
        choice = json.loads(data.removeprefix(b"data: "))["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "Say" + "".join(TEXTS[:3]), 1: "Say" + "".join(TEXTS[:3]), 2: "Tell" + "".join(TEXTS[:3]), 3: "Tell" + "".join(TEXTS[:3])}
