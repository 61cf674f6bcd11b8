"""`pagewire gateway`: the public gRPC API and the OpenAI-style REST shim in
one process and one event loop, in front of a tokenizer service and one or
more engine replicas."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from pagewire.services.common.grpc_utils import RunningServer, channel_options, error_status, start_service_server, stop_on_signals
from pagewire.services.common.logging import get_logger
from pagewire.v1 import gateway_pb2
from pagewire.services.gateway.config import GatewayConfig
from pagewire.services.gateway.router import RoutingPolicy

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp, Receive, Scope, Send

    from pagewire.services.gateway.admission import SharedCount
    from pagewire.services.gateway.hub import Gateway
    from pagewire.services.gateway.workers import WorkerPlace

log = get_logger("gateway")

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
# How often readiness follows the peers' connection state.
READINESS_POLL_S = 0.2
# After the grace period: the seconds uvicorn gets to cancel the REST requests
# still running (its timeout_graceful_shutdown, whole seconds), and to exit in
# all (it notices should_exit within 0.1 s, then pauses 0.1 s before waiting).
REST_CANCEL_S = 1
REST_EXIT_S = REST_CANCEL_S + 1.0
# Seconds an idle REST connection stays open.
REST_KEEP_ALIVE_S = 75
SHUTTING_DOWN = "the gateway is shutting down; send new requests to another replica or retry after it restarts"


CONFIG = GatewayConfig


def _bind(host: str, port: int, shared: bool) -> socket.socket:
    """The REST listener; `shared` by every gateway worker of the server."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class RestAdmission:
    """The REST front door: counts the requests it let in, and once closed
    answers every new one with `refusal` (the listener stays open meanwhile,
    so that clients get a 503 saying why instead of a refused connection)."""

    def __init__(self, app: ASGIApp, refusal: ASGIApp) -> None:
        self.app = app
        self.refusal = refusal
        self.closed = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.closed:
            await self.refusal(scope, receive, send)
            return
        self._in_flight += 1
        self._idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> None:
        """Return once the requests let in have ended, or after timeout_s."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        if self._in_flight:
            log.warning("REST requests still running after the grace period", requests=self._in_flight)


class SharedPortHealth(health_aio.HealthServicer):
    """Health of one of several workers on a shared port. Each worker's
    stored readiness follows a poll, so when the last worker becomes ready
    the others would go on answering NOT_SERVING for up to a poll period,
    and a probe that saw SERVING on one could see NOT_SERVING on the next
    connection. A readiness Check is therefore answered from the workers'
    shared state at the time of the call: SERVING once every worker has been
    ready and this one is, until the drain begins."""

    def __init__(self, readiness_service: str, ready_now: Callable[[], bool]):
        super().__init__()
        self._readiness_service = readiness_service
        self._ready_now = ready_now
        self._draining = False

    async def enter_graceful_shutdown(self) -> None:
        self._draining = True
        await super().enter_graceful_shutdown()

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        if not self._draining and request.service == self._readiness_service and self._ready_now():
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        return await super().Check(request, context)


async def _follow_readiness(gateway: Gateway, running: RunningServer, workers: SharedCount | None) -> None:
    """Report SERVING while the tokenizer and at least one replica are up,
    and, among several workers, once every worker has been ready: a probe
    of the shared port reaches any one of them, and says that the server
    as a whole has started."""
    serving: bool | None = None
    while True:
        ready = gateway.ready
        if ready and workers is not None:
            workers.mark_ready()
            ready = workers.all_ready_once()
        if ready != serving:
            serving = ready
            await running.set_serving(serving)
            log.info("readiness", serving=serving)
        await asyncio.sleep(READINESS_POLL_S)


async def _drain(running: RunningServer, rest: uvicorn.Server, admission: RestAdmission, readiness: asyncio.Task[None], grace_s: float) -> None:
    """Close both front doors at once, give the requests running on either
    one shared grace period, then stop both servers."""
    admission.closed = True
    # A peer that reconnects mid-drain must not turn readiness back to SERVING.
    readiness.cancel()
    await asyncio.gather(readiness, return_exceptions=True)
    await running.health.enter_graceful_shutdown()
    log.info("draining", grace_s=grace_s)
    await asyncio.gather(running.drain_and_stop(grace_s), admission.wait_idle(grace_s))
    rest.should_exit = True


async def serve(config: GatewayConfig) -> int:
    from pagewire.services.gateway.workers import WorkerPlace, run_workers

    place = WorkerPlace.from_environment()
    if place is None and config.gateway_workers > 1:
        return await run_workers(config)
    return await _serve_one(config, place)


async def _serve_one(config: GatewayConfig, place: WorkerPlace | None) -> int:
    """One gateway: the only one, or worker `place` of several."""
    # Imported here so that the CLI (and `pagewire health` probes) stay quick.
    import structlog
    import uvicorn

    if place is not None:
        # Every line of this worker names it, those of its requests included.
        structlog.contextvars.bind_contextvars(worker=place.index)

    from pagewire.services.common.auth import ApiKeyMiddleware, grpc_interceptors
    from pagewire.v1 import gateway_pb2_grpc
    from pagewire.services.common.tls import TlsFiles
    from pagewire.services.gateway.connection import Backoff
    from pagewire.services.gateway.discovery import TargetError
    from pagewire.services.gateway.grpc_api import GenerationServicer
    from pagewire.services.gateway.admission import SharedCount
    from pagewire.services.gateway.metrics import GatewayMetrics
    from pagewire.services.gateway.hub import Gateway, GatewaySettings
    from pagewire.services.gateway.output_buffer import OutputLimits
    from pagewire.services.gateway.rest_api import create_app, status_response

    class EmbeddedUvicorn(uvicorn.Server):
        """uvicorn on the gateway's event loop; shutdown signals are the gateway's to handle."""

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            yield

    settings = GatewaySettings(
        tokenizers=config.tokenizer,
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
        max_message_bytes=config.max_message_bytes,
        # Half a message at most, so that every chunk fits one with room to spare.
        output=OutputLimits(min(config.max_buffered_output_bytes, config.max_message_bytes // 2), config.client_read_timeout_s),
    )
    tls = TlsFiles.from_options(config.tls_cert, config.tls_key)
    workers = SharedCount(place.slots, place.index) if place is not None else None
    try:
        gateway = Gateway(settings, GatewayMetrics(whole_server=workers is not None), workers)
    except TargetError as exc:
        log.error("bad --engine value", error=str(exc))
        return 2
    try:
        http_socket = _bind(config.host, config.http_port, shared=workers is not None)
    except OSError as exc:
        log.error("cannot bind the REST port", address=f"{config.host}:{config.http_port}", error=str(exc))
        return 1
    running = await start_service_server(
        config,
        lambda server: gateway_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(gateway, config.max_message_bytes), server),
        SERVICE_NAME,
        interceptors=grpc_interceptors(config.api_key),
        credentials=tls.grpc_server_credentials() if tls else None,
        options=[("grpc.so_reuseport", 1)] if workers is not None else [],
        health=SharedPortHealth(SERVICE_NAME, lambda: gateway.ready and workers.all_ready_once()) if workers is not None else None,
    )
    app = create_app(gateway, config.max_message_bytes)
    refusal = status_response(error_status(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN))
    # Keep-alive clients then open their next connection elsewhere.
    refusal.headers["Connection"] = "close"
    admission = RestAdmission(ApiKeyMiddleware(app, config.api_key) if config.api_key else app, refusal)
    rest = EmbeddedUvicorn(
        uvicorn.Config(
            admission,
            # The C parser: h11's pure-Python one cost more CPU per SSE event than the rest of the gateway's path.
            http="httptools",
            log_config=None,
            access_log=False,
            lifespan="off",
            # The grace period is spent in _drain already.
            timeout_graceful_shutdown=REST_CANCEL_S,
            # Longer than clients keep an idle connection (httpx and so the
            # openai client: 5 s; load balancers: 60 s), so the server never
            # closes one just as a client sends on it.
            timeout_keep_alive=REST_KEEP_ALIVE_S,
            **(tls.uvicorn_options() if tls else {}),
        )
    )
    http_port = http_socket.getsockname()[1]
    background = [
        asyncio.create_task(gateway.run(), name="peers"),
        asyncio.create_task(_follow_readiness(gateway, running, workers), name="readiness"),
        asyncio.create_task(rest.serve(sockets=[http_socket]), name="rest"),
    ]
    log.info(
        "gateway listening",
        grpc=f"{config.host}:{running.port}",
        rest=f"{'https' if tls else 'http'}://{config.host}:{http_port}/v1",
        tokenizer=config.tokenizer,
        engines=config.engine,
        routing=config.routing,
        worker=place.index if place is not None else None,
    )
    stop = stop_on_signals()
    signalled = asyncio.create_task(stop.wait(), name="signal")
    grpc_ended = asyncio.create_task(running.server.wait_for_termination(), name="grpc")
    done, _ = await asyncio.wait([signalled, grpc_ended, *background], return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    for task in done:
        if task in background and not task.cancelled() and task.exception() is not None:
            log.error("gateway task failed", task=task.get_name(), error=repr(task.exception()))
            exit_code = 1
    # Only a signal asks for a drain; after a failure nothing is waited for.
    await _drain(running, rest, admission, background[1], config.shutdown_grace_s if stop.is_set() else 0.0)
    await asyncio.wait([background[2]], timeout=REST_EXIT_S)
    for task in [signalled, grpc_ended, *background]:
        task.cancel()
    await asyncio.gather(signalled, grpc_ended, *background, return_exceptions=True)
    http_socket.close()
    log.info("gateway stopped", exit_code=exit_code)
    return exit_code
