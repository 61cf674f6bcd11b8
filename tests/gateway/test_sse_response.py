"""A streamed REST response writes the chunks a request hands out between
two of its writes as one body message, with the events StreamEvents gives
them; its status waits for the first chunk; a client that goes away ends the
request."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
from google.rpc import status_pb2

from pagewire.services.common.grpc_utils import error_status
from pagewire.services.gateway.openai_schemas import CompletionFormat
from pagewire.services.gateway.request import ChunkStream, Emit
from pagewire.services.gateway.sse import DONE, Envelope, StreamEvents
from pagewire.services.gateway.sse_response import EventStreamResponse
from pagewire.v1 import common_pb2, gateway_pb2

LENGTH = common_pb2.FINISH_REASON_LENGTH
ERROR = common_pb2.FINISH_REASON_ERROR


class ScriptedRequest(ChunkStream):
    """Hands out each step's chunks at once (as the peers' callbacks do), then
    lets the loop run before the next step, and ends right after its last
    chunk (as a request does); `hold` keeps it from starting."""

    def __init__(self, steps: list[list[gateway_pb2.GenerateChunk]], hold: bool = False):
        self.steps = steps
        self.taken_count = 0
        self.cancelled = False
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def run(self, emit: Emit) -> None:
        try:
            await self.release.wait()
            for i, step in enumerate(self.steps):
                if i:
                    await asyncio.sleep(0.01)
                for chunk in step:
                    emit(chunk)
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    def taken(self) -> None:
        self.taken_count += 1


def _error_body(status: status_pb2.Status) -> tuple[int, dict[str, Any]]:
    return 429, {"error": {"message": status.message}}


async def _serve(request: ScriptedRequest, disconnect_after_s: float | None = None, choices: int = 1) -> list[dict[str, Any]]:
    """The ASGI messages the response sends."""
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    if disconnect_after_s is not None:
        asyncio.get_running_loop().call_later(disconnect_after_s, gone.set)
    envelope = Envelope(CompletionFormat(choices), 1700000000, "m", include_usage=True)
    response = EventStreamResponse(request, "req-1", StreamEvents(envelope), _error_body)
    scope = {"type": "http", "path": "/v1/completions"}
    await asyncio.wait_for(response(scope, receive, send), 10)
    return sent


def _events(chunks: list[gateway_pb2.GenerateChunk], choices: int = 1) -> bytes:
    """What StreamEvents gives each chunk, for a fresh response's envelope."""
    stream = StreamEvents(Envelope(CompletionFormat(choices), 1700000000, "m", include_usage=True))
    return b"".join(stream.chunk(chunk) for chunk in chunks)


def _without_ids(data: bytes) -> bytes:
    """Each response has its own completion id."""
    events = [json.loads(line.removeprefix(b"data: ")) for line in data.split(b"\n\n") if line and line != DONE.strip()]
    return json.dumps([{key: value for key, value in body.items() if key != "id"} for body in events]).encode()


def test_each_steps_chunks_go_out_in_one_write_and_the_last_with_the_end_marker() -> None:
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=4)
    steps = [
        [gateway_pb2.GenerateChunk(text="a")],
        [gateway_pb2.GenerateChunk(text="b"), gateway_pb2.GenerateChunk(text="c")],
        [gateway_pb2.GenerateChunk(text="d", finish_reason=LENGTH, usage=usage)],
    ]
    request = ScriptedRequest(steps)
    sent = asyncio.run(_serve(request))
    start, *bodies = sent
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert [message["more_body"] for message in bodies] == [True, True, False]
    data = b"".join(message["body"] for message in bodies)
    assert data.endswith(DONE)
    assert _without_ids(data) == _without_ids(_events([chunk for step in steps for chunk in step]))
    # Every chunk is taken once its write has been sent.
    assert request.taken_count == 4


def test_a_choice_that_finishes_before_the_others_does_not_end_the_stream() -> None:
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=3)
    steps = [
        [gateway_pb2.GenerateChunk(text="a", index=0), gateway_pb2.GenerateChunk(text="a", index=1)],
        [gateway_pb2.GenerateChunk(text="b", index=0, finish_reason=LENGTH)],
        [gateway_pb2.GenerateChunk(text="c", index=1, finish_reason=LENGTH, usage=usage)],
    ]
    request = ScriptedRequest(steps)
    _, *bodies = asyncio.run(_serve(request, choices=2))
    data = b"".join(message["body"] for message in bodies)
    assert bodies[-1]["more_body"] is False and data.endswith(DONE) and data.count(DONE) == 1
    assert _without_ids(data) == _without_ids(_events([chunk for step in steps for chunk in step], choices=2))
    assert request.taken_count == 4


def test_a_request_that_fails_before_any_output_gets_a_plain_error_response() -> None:
    refused = gateway_pb2.GenerateChunk(finish_reason=ERROR, error=error_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"))
    start, body = asyncio.run(_serve(ScriptedRequest([[refused]])))
    assert start["status"] == 429 and (b"content-type", b"application/json") in start["headers"]
    assert json.loads(body["body"])["error"]["message"] == "full"


def test_a_failure_after_the_first_event_is_one_more_event_then_the_end_marker() -> None:
    failed = gateway_pb2.GenerateChunk(finish_reason=ERROR, error=error_status(grpc.StatusCode.UNAVAILABLE, "replica went away"))
    start, *bodies = asyncio.run(_serve(ScriptedRequest([[gateway_pb2.GenerateChunk(text="a")], [failed]])))
    assert start["status"] == 200
    last = bodies[-1]["body"]
    assert last.endswith(DONE) and json.loads(last.removesuffix(DONE).removeprefix(b"data: "))["error"]["message"] == "replica went away"


def test_a_client_that_goes_away_before_any_output_ends_the_request() -> None:
    request = ScriptedRequest([[gateway_pb2.GenerateChunk(text="a")]], hold=True)
    assert asyncio.run(_serve(request, disconnect_after_s=0.05)) == []
    assert request.cancelled
