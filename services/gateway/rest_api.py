"""OpenAI-compatible REST shim, served by the gateway process on its own event
loop and feeding the same request path as the gRPC API.

The request and response bodies are in openai_schemas.py; this module holds
the app and the mapping of errors to HTTP.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events ending in `data: [DONE]`, and
`stream_options.include_usage`), GET /v1/models, GET /health, GET /metrics.

Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`,
with `code` the gRPC status name (e.g. "INVALID_ARGUMENT"):

    400 invalid_request_error      bad parameters, malformed JSON, wrong types,
                                   fields not implemented or unknown
    404 not_found_error            unknown model or path
    413 invalid_request_error      body over what the models' max_model_len
                                   can use, or over --max-message-bytes
    415 invalid_request_error      a POST body not sent as application/json
    429 rate_limit_error           gateway at --max-concurrent-requests
    503 service_unavailable_error  tokenizer or engine replica unavailable
    504 timeout_error              deadline exceeded
    500 internal_error             anything else

Streaming: the HTTP status goes out with the first event, so a request that
fails before producing output gets the plain error response above. A failure
after the first event arrives as one more event with the same error body,
followed by the end marker:

    data: {"error": {"message": "engine replica 10.0.0.7:50053 went away ...",
                     "type": "service_unavailable_error", "param": null, "code": "UNAVAILABLE"}}

    data: [DONE]

finish_reason is "stop", "length", "abort" (cancelled) or "time_limit".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from google.rpc import status_pb2
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from starlette.exceptions import HTTPException

from pagewire.services.common.errors import RequestError, invalid_argument
from pagewire.services.common.grpc_utils import error_status, status_code, to_status, violated_field
from pagewire.services.common.limits import max_rest_body_bytes
from pagewire.services.common.logging import get_logger
from pagewire.services.gateway.hub import Gateway
from pagewire.services.gateway.openai_schemas import (
    ChatBody, CompletionBody, CompletionFormat, LoadLoraBody, UnloadLoraBody, merge_choices, public_param,
)  # fmt: skip
from pagewire.services.gateway.sse import Envelope, StreamEvents
from pagewire.services.gateway.sse_response import EventStreamResponse, until_disconnected
from pagewire.v1 import gateway_pb2

T = TypeVar("T")
B = TypeVar("B", bound=BaseModel)

log = get_logger("gateway")

HTTP_ERRORS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
# Seconds /metrics waits for each engine's Stats before showing the last figures.
STATS_TIMEOUT_S = 2.0


# --- errors -----------------------------------------------------------------


def error_body(message: str, error_type: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def status_body(status: status_pb2.Status, constraint_param: str = "response_format") -> tuple[int, dict[str, Any]]:
    """`constraint_param`: the REST field the request's constraint came from."""
    code = status_code(status)
    http_status, error_type = HTTP_ERRORS.get(code, (500, "internal_error"))
    return http_status, error_body(status.message, error_type, code.name, public_param(violated_field(status), constraint_param))


def status_response(status: status_pb2.Status, constraint_param: str = "response_format") -> JSONResponse:
    http_status, body = status_body(status, constraint_param)
    return JSONResponse(body, status_code=http_status)


def _describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if not location:
        return f"the request body is invalid: {first.get('msg')}", None
    # Union types report one error per alternative; the field and its value say enough.
    field = location[0]
    shown = json.dumps(first.get("input"), default=str)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{'.'.join(location)}: {first.get('msg')} (got {shown})", field


# --- the app ----------------------------------------------------------------


class BodyRefused(Exception):
    """A POST body refused before it is parsed: its HTTP status and the gRPC
    code the error body names."""

    def __init__(self, http_status: int, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.http_status = http_status
        self.code = code


class ClientDisconnected(Exception):
    """The client of a request went away before its response."""

    def __init__(self, request_id: str):
        super().__init__(request_id)
        self.request_id = request_id


def _check_json_content_type(request: Request) -> None:
    """Only application/json (UTF-8) is parsed: a browser sends a cross-site
    POST of any other type ("simple" ones: text/plain, forms) without asking
    the server first, and nothing should come of it."""
    media_type, *parameters = request.headers.get("content-type", "").split(";")
    charsets = [value.strip().strip('"').lower() for name, _, value in (p.partition("=") for p in parameters) if name.strip().lower() == "charset"]
    if media_type.strip().lower() != "application/json" or any(charset not in ("utf-8", "utf8") for charset in charsets):
        shown = request.headers.get("content-type", "none")
        raise BodyRefused(415, grpc.StatusCode.INVALID_ARGUMENT, f"the request body must be JSON sent as Content-Type: application/json, got {shown[:80]!r}")


async def _read_body(request: Request, limit: int, why: str) -> bytes:
    def too_large(size: int) -> BodyRefused:
        return BodyRefused(413, grpc.StatusCode.RESOURCE_EXHAUSTED, f"the request body has {size} bytes; at most {limit} are accepted ({why})")

    _check_json_content_type(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared))
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large(len(body))
    return bytes(body)


def _check_list_sizes(value: list[Any] | dict[str, Any], longest: int, path: str) -> None:
    """Refuse any array or object of more than `longest` members, walking no
    further than that into each: a request to a model of max_model_len
    `longest` has no use for one (a prompt of ids, a chat's messages, stop
    strings), and validating each member costs far more than its bytes.
    Only containers are walked into, and only those that hold containers: a
    prompt of ids costs a length check and a pass over its members' types,
    not a call per id (JSON gives exact list and dict types)."""
    if len(value) > longest:
        field = path.split(".")[0]
        raise invalid_argument(f"{path} has {len(value)} items; no request to a model of max_model_len {longest} can use more than {longest}", field=field)
    members = value.values() if isinstance(value, dict) else value
    if set(map(type, members)).isdisjoint((list, dict)):
        return
    for key, member in value.items() if isinstance(value, dict) else enumerate(value):
        if isinstance(member, (list, dict)):
            _check_list_sizes(member, longest, f"{path}.{key}" if path else str(key))


def _parse(model: type[B], body: bytes, max_model_len: int) -> B:
    try:
        data = from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": str(exc), "ctx": {"error": str(exc)}}]) from exc
    # Sizes first: pydantic's validation of a long list costs far more than its JSON.
    if isinstance(data, (list, dict)):
        _check_list_sizes(data, max_model_len, "")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


async def _unless_disconnected(request: Request, work: Awaitable[T], request_id: str) -> T:
    """Await `work`; ClientDisconnected, once `work` is cancelled, if the
    client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request.receive))
    gone = False
    try:
        done, _ = await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
        gone = task not in done
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if gone:
        await asyncio.gather(task, return_exceptions=True)  # the request's own clean-up
        raise ClientDisconnected(request_id)
    return await task


def create_app(gateway: Gateway, max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="pagewire", description="OpenAI-compatible REST API of the pagewire gateway.")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", "INVALID_ARGUMENT", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), error_type, str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(BodyRefused)
    async def body_refused(request: Request, exc: BodyRefused) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_request_error", exc.code.name), status_code=exc.http_status)

    @app.exception_handler(ClientDisconnected)
    async def client_disconnected(request: Request, exc: ClientDisconnected) -> Response:
        # An expected end, not a failure: the request was aborted already.
        log.info("client disconnected", request_id=exc.request_id, path=request.url.path)
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    def body_limit() -> tuple[int, int, str]:
        """The longest max_model_len served, the body limit it gives, and why."""
        gateway.resolve_model("")  # UNAVAILABLE, as for any request, while no replica has connected
        longest = max(card.max_model_len for card in gateway.models())
        derived = max_rest_body_bytes(longest)
        if derived < max_body_bytes:
            return longest, derived, f"a prompt of max_model_len {longest} tokens and the other fields"
        return longest, max_body_bytes, "--max-message-bytes"

    async def read(request: Request, model: type[B]) -> B:
        max_model_len, limit, why = body_limit()
        return _parse(model, await _read_body(request, limit, why), max_model_len)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return status_response(to_status(exc))

    async def generate(request: Request, body: CompletionBody | ChatBody, output: CompletionFormat) -> Response:
        target = await gateway.resolve(body.model)
        envelope = Envelope(output, int(time.time()), target.lora or target.info.model_id, body.include_usage)
        gateway_request = gateway.request(*body.to_requests())
        constraint_param = body.constraint_param()

        if not body.stream:

            async def collect() -> list[gateway_pb2.GenerateChunk]:
                async with aclosing(gateway_request.chunks()) as chunks:
                    return [chunk async for chunk in chunks]

            collected = await _unless_disconnected(request, collect(), gateway_request.id)
            choices, failed = merge_choices(collected)
            if failed is not None:
                return status_response(failed.error, constraint_param)
            return JSONResponse(envelope.body([output.choice(choice, streaming=False) for choice in choices], False, collected[-1].usage))

        return EventStreamResponse(gateway_request, gateway_request.id, StreamEvents(envelope), lambda status: status_body(status, constraint_param))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read(request, CompletionBody)
        return await generate(request, body, body.output_format())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read(request, ChatBody)
        return await generate(request, body, body.output_format())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        await gateway.refresh_models()  # adapters loaded through another worker or at the engine
        return {
            "object": "list",
            "data": [
                {"id": card.id, "object": "model", "created": 0, "owned_by": card.owned_by, "max_model_len": card.max_model_len}
                | ({"parent": card.parent, "root": card.parent} if card.parent else {})
                for card in gateway.models()
            ],
        }

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> dict[str, Any]:
        body = await read(request, LoadLoraBody)
        replicas = await gateway.load_lora_adapter(body.lora_name, body.lora_path, body.model)
        log.info("LoRA adapter loaded", name=body.lora_name, path=body.lora_path, replicas=replicas)
        return {"object": "lora_adapter", "lora_name": body.lora_name, "loaded": True, "replicas": replicas}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> dict[str, Any]:
        body = await read(request, UnloadLoraBody)
        replicas = await gateway.unload_lora_adapter(body.lora_name)
        log.info("LoRA adapter unloaded", name=body.lora_name, replicas=replicas)
        return {"object": "lora_adapter", "lora_name": body.lora_name, "loaded": False, "replicas": replicas}

    @app.get("/health")
    async def health() -> JSONResponse:
        if gateway.ready:
            return JSONResponse({"status": "ok"})
        status = error_status(grpc.StatusCode.UNAVAILABLE, "the gateway is not connected to the tokenizer and an engine replica yet")
        return status_response(status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await gateway.render_metrics(STATS_TIMEOUT_S), media_type=CONTENT_TYPE_LATEST)

    return app
