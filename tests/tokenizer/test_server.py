"""The tokenizer service over a real server on a free port: health,
reflection, and a multiplexed stream that survives a bad request."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pagewire.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from pagewire.services.tokenizer.server import SERVICE_NAME, TokenizerConfig, start
from tests.support.harness import free_port


async def _session(port: int, hf_tokenizer) -> None:
    running = await start(TokenizerConfig(port=port))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            listing = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name async for reply in listing for s in reply.list_services_response.service}
            assert SERVICE_NAME in names

            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            call = stub.Tokenize()
            await call.write(tokenizer_pb2.TokenizeBatch(requests=[tokenizer_pb2.TokenizeRequest(request_id="bad", text="")]))
            refused = await call.read()
            assert refused.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            await call.write(tokenizer_pb2.TokenizeBatch(requests=[tokenizer_pb2.TokenizeRequest(request_id="ok", text="still here")]))
            accepted = await call.read()
            assert list(accepted.results[0].token_ids) == hf_tokenizer("still here")["input_ids"]
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK

            await running.set_serving(False)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await running.drain_and_stop(1.0)


def test_tokenizer_server_on_a_free_port(hf_tokenizer) -> None:
    asyncio.run(_session(free_port(), hf_tokenizer))


def test_health_command_exits_zero_only_for_a_serving_service(hf_tokenizer) -> None:
    from pagewire.services.cli import main

    port = free_port()
    assert main(["health", f"127.0.0.1:{port}", "--timeout", "0.5"]) == 1

    async def probe() -> list[int]:
        running = await start(TokenizerConfig(port=port))
        try:
            serving = await asyncio.to_thread(main, ["health", f"127.0.0.1:{port}", "--service", SERVICE_NAME])
            await running.set_serving(False)
            draining = await asyncio.to_thread(main, ["health", f"127.0.0.1:{port}", "--service", SERVICE_NAME])
            return [serving, draining]
        finally:
            await running.drain_and_stop(1.0)

    assert asyncio.run(probe()) == [0, 1]
