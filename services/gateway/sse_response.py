"""The transport of a streamed REST response: a request's chunks, as
server-sent events, written to its HTTP connection.

The request's chunks are handed out in the peers' stream callbacks (request.py),
most of them one per request per engine step. Here a chunk is only queued
there, and the response's own task turns whatever has gathered since its last
write into events and writes them as one body message: one write per step per
stream at most, and no queue, iterator or task hop per chunk between the
request and the connection. Building the events in the response's task
rather than in the callback keeps a fault in one response's serialization
out of the streams that every request shares.

The status goes out with the first events, so a request that fails before
any output gets the plain error response instead. A client that goes away
ends the request, which aborts it in the engine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from google.rpc import status_pb2
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from pagewire.services.common.logging import get_logger
from pagewire.services.gateway.request import ChunkStream
from pagewire.services.gateway.sse import DONE, StreamEvents, event
from pagewire.v1 import gateway_pb2

log = get_logger("gateway")

# The HTTP status and OpenAI error body of a failed request.
ErrorBody = Callable[[status_pb2.Status], tuple[int, dict[str, Any]]]


async def until_disconnected(receive: Receive) -> None:
    """Returns when the client closes the connection (the body is read already,
    so the next ASGI message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(Response):
    """A streamed request's response: its events as they come, ending in the
    end marker (after an error event when the request fails once streaming)."""

    media_type = "text/event-stream"

    def __init__(self, request: ChunkStream, request_id: str, events: StreamEvents, error_body: ErrorBody):
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache"})
        self._request = request
        self._request_id = request_id
        self._events = events
        self._error_body = error_body
        # Chunks handed out since the last write, oldest first.
        self._chunks: list[gateway_pb2.GenerateChunk] = []
        self._ready = asyncio.Event()

    def _hand_out(self, chunk: gateway_pb2.GenerateChunk) -> None:
        self._chunks.append(chunk)
        self._ready.set()

    def _wake(self, _: asyncio.Future[None]) -> None:
        self._ready.set()

    def _serialize(self, chunks: list[gateway_pb2.GenerateChunk], opening: bool) -> tuple[bytearray, bool]:
        """The events of `chunks` (after the opening ones when `opening`), and
        whether one of them failed the request, which ends the stream."""
        data = bytearray(self._events.opening() if opening else b"")
        for chunk in chunks:
            if chunk.error.code:
                data += event(self._error_body(chunk.error)[1])
                return data, True
            data += self._events.chunk(chunk)
        return data, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        run = asyncio.ensure_future(self._request.run(self._hand_out))
        gone = asyncio.ensure_future(until_disconnected(receive))
        run.add_done_callback(self._wake)
        gone.add_done_callback(self._wake)
        started = False
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                if gone.done():
                    # An expected end, not a failure: the request is aborted below.
                    log.info("client disconnected", request_id=self._request_id, path=scope["path"])
                    return
                # A request hands out its last chunk before its run ends (with
                # several choices each one's last has a finish reason), so once
                # the run has ended every chunk is here.
                finished = run.done()
                if finished:
                    run.result()  # a fault of the gateway breaks the stream off without the end marker
                chunks, self._chunks = self._chunks, []
                if not started and chunks and chunks[0].error.code:
                    http_status, body = self._error_body(chunks[0].error)
                    await JSONResponse(body, status_code=http_status)(scope, receive, send)
                    return
                data, failed = self._serialize(chunks, opening=not started)
                ended = finished or failed
                if ended:
                    data += DONE
                if not chunks and not ended:
                    continue
                if not started:
                    await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                    started = True
                await send({"type": "http.response.body", "body": bytes(data), "more_body": not ended})
                # The connection took them: the client is reading.
                for _ in chunks:
                    self._request.taken()
                if ended:
                    await run  # a failed request's run ends right after its last chunk
                    return
        finally:
            gone.cancel()
            if not run.done():
                run.cancel()
            await asyncio.gather(run, gone, return_exceptions=True)
