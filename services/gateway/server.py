"""`pagewire gateway`: the public gRPC API and the OpenAI-style REST shim in
one process and one event loop, in front of a tokenizer service and one or
more engine replicas."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

from typing import TYPE_CHECKING

from services.common.config import ServiceConfig, option
from services.common.grpc_utils import RunningServer, channel_options, serve_until_signalled, start_server
from services.common.logging import get_logger
from services.common.pb.pagewire.v1 import gateway_pb2
from services.gateway.router import RoutingPolicy

if TYPE_CHECKING:
    from services.gateway.pipeline import Gateway

log = get_logger("gateway")

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
# How often readiness follows the peers' connection state.
READINESS_POLL_S = 0.2


@dataclass
class GatewayConfig(ServiceConfig):
    """The pagewire gateway: public gRPC API and OpenAI-style REST shim."""

    port: int = option(50051, "gRPC port of the public API.")
    http_port: int = option(8000, "Port of the OpenAI-style REST API (same host as gRPC).")
    tokenizer: str = option("127.0.0.1:50052", "Address of the tokenizer service.")
    engine: list[str] = option(
        ["127.0.0.1:50053"],
        "Engine replicas: HOST:PORT, dns:///NAME:PORT (every address NAME resolves to) or file:///PATH (HOST:PORT lines); "
        "repeat the flag for several (environment: comma-separated).",
    )
    discovery_interval_s: float = option(5.0, "Seconds between re-resolutions of dns:/// and file:/// engine targets.")
    routing: str = option(RoutingPolicy.LEAST_LOADED.value, "How requests are spread over engine replicas.", choices=[p.value for p in RoutingPolicy])
    prefix_affinity_blocks: int = option(1, "Leading prompt blocks whose hash picks the replica under prefix-affinity routing.")
    max_concurrent_requests: int = option(4096, "Requests in flight beyond which new ones are refused (RESOURCE_EXHAUSTED / HTTP 429).")
    connect_timeout_s: float = option(5.0, "Seconds one connection attempt to a peer may take.")
    reconnect_initial_s: float = option(0.25, "First wait before reconnecting to a peer that went away; doubles per failed attempt.")
    reconnect_max_s: float = option(2.0, "Longest wait between reconnection attempts.")
    shutdown_grace_s: float = option(10.0, "Seconds in-flight requests may finish after SIGTERM/SIGINT.")
    api_key: str = option("", "Require 'Authorization: Bearer KEY' on both public ports (health, reflection and /metrics stay open); empty: no key.")
    tls_cert: str = option("", "PEM certificate chain for TLS on both public ports; with --tls-key.")
    tls_key: str = option("", "PEM private key for TLS on both public ports; with --tls-cert.")


CONFIG = GatewayConfig


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


async def _follow_readiness(gateway: Gateway, running: RunningServer) -> None:
    """Report SERVING while the tokenizer and at least one replica are up."""
    serving: bool | None = None
    while True:
        if gateway.ready != serving:
            serving = gateway.ready
            await running.set_serving(serving)
            log.info("readiness", serving=serving)
        await asyncio.sleep(READINESS_POLL_S)


async def serve(config: GatewayConfig) -> int:
    # Imported here so that the CLI (and `pagewire health` probes) stay quick.
    import uvicorn

    from services.common.auth import ApiKeyMiddleware, grpc_interceptors
    from services.common.pb.pagewire.v1 import gateway_pb2_grpc
    from services.common.tls import TlsFiles
    from services.gateway.connection import Backoff
    from services.gateway.discovery import TargetError
    from services.gateway.grpc_api import GenerationServicer
    from services.gateway.metrics import GatewayMetrics
    from services.gateway.pipeline import Gateway, GatewaySettings
    from services.gateway.rest_api import create_app

    class EmbeddedUvicorn(uvicorn.Server):
        """uvicorn on the gateway's event loop; shutdown signals are the gateway's to handle."""

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            yield

    settings = GatewaySettings(
        tokenizer=config.tokenizer,
        engines=config.engine,
        routing=RoutingPolicy(config.routing),
        affinity_blocks=config.prefix_affinity_blocks,
        max_concurrent_requests=config.max_concurrent_requests,
        # gRPC's own reconnect backoff grows to minutes while a peer loads its
        # model; keep it within ours so that a peer is found soon after it is up.
        channel_options=channel_options(config.max_message_bytes)
        + [
            ("grpc.initial_reconnect_backoff_ms", int(config.reconnect_initial_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(config.reconnect_initial_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(config.reconnect_max_s * 1000)),
        ],
        backoff=Backoff(config.reconnect_initial_s, config.reconnect_max_s),
        connect_timeout_s=config.connect_timeout_s,
        discovery_interval_s=config.discovery_interval_s,
    )
    tls = TlsFiles.from_options(config.tls_cert, config.tls_key)
    try:
        gateway = Gateway(settings, GatewayMetrics())
    except TargetError as exc:
        log.error("bad --engine value", error=str(exc))
        return 2
    try:
        http_socket = _bind(config.host, config.http_port)
    except OSError as exc:
        log.error("cannot bind the REST port", address=f"{config.host}:{config.http_port}", error=str(exc))
        return 1
    running = await start_server(
        config.host,
        config.port,
        config.max_message_bytes,
        [lambda server: gateway_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(gateway), server)],
        [SERVICE_NAME],
        interceptors=grpc_interceptors(config.api_key),
        credentials=tls.grpc_server_credentials() if tls else None,
    )
    app = create_app(gateway, config.max_message_bytes)
    rest = EmbeddedUvicorn(
        uvicorn.Config(
            ApiKeyMiddleware(app, config.api_key) if config.api_key else app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(config.shutdown_grace_s),
            **(tls.uvicorn_options() if tls else {}),
        )
    )
    http_port = http_socket.getsockname()[1]
    background = [
        asyncio.create_task(gateway.run(), name="peers"),
        asyncio.create_task(_follow_readiness(gateway, running), name="readiness"),
        asyncio.create_task(rest.serve(sockets=[http_socket]), name="rest"),
    ]
    log.info(
        "gateway listening",
        grpc=f"{config.host}:{running.port}",
        rest=f"{'https' if tls else 'http'}://{config.host}:{http_port}/v1",
        tokenizer=config.tokenizer,
        engines=config.engine,
        routing=config.routing,
    )
    server_done = asyncio.create_task(serve_until_signalled(running, config.shutdown_grace_s))
    done, _ = await asyncio.wait([server_done, *background], return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    for task in done:
        if task is not server_done and not task.cancelled() and task.exception() is not None:
            log.error("gateway task failed", task=task.get_name(), error=repr(task.exception()))
            exit_code = 1
    rest.should_exit = True
    if not server_done.done():
        await running.drain_and_stop(0)
        server_done.cancel()
    await asyncio.wait([background[2]], timeout=config.shutdown_grace_s)
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    http_socket.close()
    log.info("gateway stopped", exit_code=exit_code)
    return exit_code
