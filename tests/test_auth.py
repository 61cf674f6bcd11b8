"""API keys and TLS on real loopback servers: a gRPC server built by
`start_server` with a small two-method service, and a FastAPI app behind the
API key middleware."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from fastapi import FastAPI, Request
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagewire.services.common.auth import ApiKeyMiddleware, bearer_key_matches, grpc_interceptors
from pagewire.services.common.grpc_utils import start_server
from pagewire.services.common.tls import TlsFiles

KEY = "sk-test-0123456789"
ECHO_SERVICE = "test.Echo"


def _register_echo(server: grpc.aio.Server) -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ECHO_SERVICE, handlers)])


def test_bearer_key_matches_only_the_exact_key() -> None:
    assert bearer_key_matches(f"Bearer {KEY}", KEY)
    assert bearer_key_matches(f"bearer {KEY}", KEY)
    assert not bearer_key_matches(KEY, KEY)
    assert not bearer_key_matches(f"Bearer {KEY}x", KEY)
    assert not bearer_key_matches("Bearer ", KEY)
    assert not bearer_key_matches(None, KEY)
    assert not bearer_key_matches(f"Basic {KEY}", KEY)


async def _grpc_calls(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> tuple[grpc.StatusCode, grpc.StatusCode, int]:
    """(unary status, bidi status, health status) seen with `metadata`."""
    unary = channel.unary_unary(f"/{ECHO_SERVICE}/Unary")
    bidi = channel.stream_stream(f"/{ECHO_SERVICE}/Bidi")
    try:
        assert await unary(b"ping", metadata=metadata, timeout=5) == b"ping"
        unary_code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        unary_code = exc.code()
    call = bidi(metadata=metadata, timeout=5)
    try:
        await call.write(b"one")
        assert await call.read() == b"one"
        await call.done_writing()
        bidi_code = await call.code()
    except grpc.aio.AioRpcError as exc:
        bidi_code = exc.code()
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return unary_code, bidi_code, health.status


async def _grpc_auth_session() -> list[tuple[grpc.StatusCode, grpc.StatusCode, int]]:
    running = await start_server("127.0.0.1", 0, 1 << 20, [_register_echo], [ECHO_SERVICE], interceptors=grpc_interceptors(KEY))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            return [
                await _grpc_calls(channel, ()),
                await _grpc_calls(channel, (("authorization", "Bearer wrong"),)),
                await _grpc_calls(channel, (("authorization", f"Bearer {KEY}"),)),
            ]
    finally:
        await running.drain_and_stop(0)


def test_grpc_api_key_refuses_missing_and_wrong_keys_and_leaves_health_open() -> None:
    missing, wrong, right = asyncio.run(_grpc_auth_session())
    serving = health_pb2.HealthCheckResponse.SERVING
    assert missing == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED, serving)
    assert wrong == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED, serving)
    assert right == (grpc.StatusCode.OK, grpc.StatusCode.OK, serving)


def test_no_api_key_means_no_interceptor() -> None:
    assert grpc_interceptors("") == []


async def _tls_session(files: TlsFiles) -> tuple[int, grpc.StatusCode]:
    running = await start_server("127.0.0.1", 0, 1 << 20, [_register_echo], [ECHO_SERVICE], credentials=files.grpc_server_credentials())
    try:
        trusted = grpc.ssl_channel_credentials(root_certificates=files.cert_path.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{running.port}", trusted) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as plaintext:
            try:
                await health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                plaintext_code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                plaintext_code = exc.code()
        return reply.status, plaintext_code
    finally:
        await running.drain_and_stop(0)


def test_tls_grpc_server_answers_tls_and_refuses_plaintext(tls_files: TlsFiles) -> None:
    status, plaintext_code = asyncio.run(_tls_session(tls_files))
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert plaintext_code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_tls_options_go_together(tls_files: TlsFiles, tmp_path: Path) -> None:
    assert TlsFiles.from_options("", "") is None
    assert TlsFiles.from_options(str(tls_files.cert_path), str(tls_files.key_path)) == tls_files
    with pytest.raises(SystemExit, match="go together"):
        TlsFiles.from_options(str(tls_files.cert_path), "")
    with pytest.raises(SystemExit, match="not found"):
        TlsFiles.from_options(str(tmp_path / "missing.pem"), str(tls_files.key_path))


def _rest_app(api_key: str) -> ApiKeyMiddleware:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    return ApiKeyMiddleware(app, api_key)


async def _rest_session() -> dict[str, httpx.Response]:
    transport = httpx.ASGITransport(app=_rest_app(KEY))
    good = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://pagewire") as client:
        return {
            "health": await client.get("/health"),
            "missing": await client.post("/v1/echo", content=b"{}"),
            "wrong": await client.post("/v1/echo", content=b"{}", headers={"authorization": "Bearer nope"}),
            "lowercase_scheme": await client.post("/v1/echo", content=b"x" * 10, headers={"authorization": f"bearer {KEY}"}),
            "right": await client.post("/v1/echo", content=b"x" * 1000, headers=good),
        }


def test_rest_api_key_refuses_missing_and_wrong_keys_and_leaves_health_open() -> None:
    replies = asyncio.run(_rest_session())
    assert replies["health"].status_code == 200
    for name in ("missing", "wrong"):
        assert replies[name].status_code == 401
        assert replies[name].headers["www-authenticate"] == "Bearer"
        error = replies[name].json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("authentication_error", "UNAUTHENTICATED")
    assert replies["lowercase_scheme"].json() == {"received": 10}
    assert replies["right"].json() == {"received": 1000}
