"""A size limit on REST request bodies, enforced before the app parses them.

A declared Content-Length over the limit is refused at once; a chunked body
is counted as it arrives and refused as soon as it passes the limit, so a
client cannot make the server buffer more than `max_body_bytes`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from services.common.auth import ASGIApp, openai_error_body, send_json
from services.common.logging import get_logger

log = get_logger("http")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodySizeLimitMiddleware:
    """ASGI middleware: 413 with an OpenAI error body for bodies over `max_body_bytes`."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def _refuse(self, send: Send, path: str, size: str) -> None:
        log.warning("request body too large", path=path, size=size, limit=self.max_body_bytes)
        message = f"the request body ({size} bytes) exceeds the limit of {self.max_body_bytes} bytes"
        await send_json(send, 413, openai_error_body(message, "invalid_request_error", code="request_too_large"), headers=[(b"connection", b"close")])

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((value for key, value in scope["headers"] if key == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(send, scope["path"], declared.decode())
            return
        # Read the whole (bounded) body first and replay it, so the app never
        # sees a partial body and the refusal is sent before any response.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                await self._refuse(send, scope["path"], f"more than {received}")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            # After the body, the app only waits for the client to go away.
            return await receive()

        await self.app(scope, replay, send)
