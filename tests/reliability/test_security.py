"""Security on real processes: a second gateway in front of the same
tokenizer and engine, with an API key (from PAGEWIRE_API_KEY) and TLS on both
public ports. Health stays open; a missing or wrong key is UNAUTHENTICATED /
401 with the OpenAI error body; plaintext is refused. The internal services
bind to localhost unless told otherwise."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagewire.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from pagewire.services.common.tls import TlsFiles
from tests.support.harness import LOOPBACK, Cluster, ServiceProcess

API_KEY = "pw-reliability-key-7f3a"


@pytest.fixture
def secured_gateway(serving_cluster: Cluster, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    secured = ServiceProcess(
        "gateway",
        [
            "--tokenizer", serving_cluster.tokenizer.address,
            "--engine", serving_cluster.engine.address,
            "--tls-cert", str(tls_files.cert_path),
            "--tls-key", str(tls_files.key_path),
        ],
        log_path=tmp_path_factory.mktemp("secured-gateway") / "gateway.log",
        env={"PAGEWIRE_API_KEY": API_KEY},
        root_certificates=tls_files.cert_path.read_bytes(),
    )  # fmt: skip
    with secured.running() as gateway:
        yield gateway


def _rest_checks(http_port: int, tls_files: TlsFiles) -> dict[str, Any]:
    base = f"https://localhost:{http_port}"
    body = {"prompt": "Hello", "max_tokens": 2}
    with httpx.Client(base_url=base, verify=ssl.create_default_context(cafile=tls_files.cert_path), timeout=30.0) as client:
        health = client.get("/health")
        missing = client.post("/v1/completions", json=body)
        wrong = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer not-the-key"})
        models_without_key = client.get("/v1/models")
        right = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert health.status_code == 200
    for refused in (missing, wrong, models_without_key):
        assert refused.status_code == 401, refused.text
        error = refused.json()["error"]
        assert error["code"] == "UNAUTHENTICATED" and error["type"] == "authentication_error", error
    assert right.status_code == 200, right.text
    assert right.json()["usage"]["completion_tokens"] == 2
    with httpx.Client(base_url=f"http://{LOOPBACK}:{http_port}", timeout=10.0) as plaintext:
        with pytest.raises(httpx.HTTPError):
            plaintext.get("/health")
    return {"rest_refused_401": 3, "rest_accepted_with_key": 1}


async def _grpc_checks(port: int, tls_files: TlsFiles) -> dict[str, Any]:
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_files.cert_path.read_bytes())
    request = gateway_pb2.GenerateRequest(text="Hello", sampling=common_pb2.SamplingParams(max_tokens=2))

    async def complete(stub: gateway_pb2_grpc.GenerationStub, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
        try:
            async for _ in stub.Complete(request, metadata=metadata, timeout=30):
                pass
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="pagewire.v1.Generation"), timeout=10)
        stub = gateway_pb2_grpc.GenerationStub(channel)
        codes = {
            "missing": await complete(stub, ()),
            "wrong": await complete(stub, (("authorization", "Bearer not-the-key"),)),
            "right": await complete(stub, (("authorization", f"Bearer {API_KEY}"),)),
        }
        try:
            await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
            codes["list_models_without_key"] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            codes["list_models_without_key"] = exc.code()
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{port}") as plaintext:
        try:
            await health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=3)
            codes["plaintext"] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            codes["plaintext"] = exc.code()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert codes["missing"] is grpc.StatusCode.UNAUTHENTICATED
    assert codes["wrong"] is grpc.StatusCode.UNAUTHENTICATED
    assert codes["list_models_without_key"] is grpc.StatusCode.UNAUTHENTICATED
    assert codes["right"] is grpc.StatusCode.OK
    assert codes["plaintext"] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return {"grpc_refused_unauthenticated": 3, "grpc_accepted_with_key": 1}


def test_api_key_and_tls_on_the_public_ports(secured_gateway: ServiceProcess, tls_files: TlsFiles, record_figures) -> None:  # type: ignore[no-untyped-def]
    assert secured_gateway.http_port is not None
    figures = _rest_checks(secured_gateway.http_port, tls_files) | asyncio.run(_grpc_checks(secured_gateway.port, tls_files))
    assert secured_gateway.alive
    record_figures(figures)


def test_internal_services_bind_to_localhost_by_default() -> None:
    from pagewire.services.engine.config import EngineConfig
    from pagewire.services.tokenizer.server import TokenizerConfig

    assert TokenizerConfig().host == LOOPBACK
    assert EngineConfig().host == LOOPBACK
