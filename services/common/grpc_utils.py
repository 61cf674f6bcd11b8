"""gRPC plumbing shared by every service: server and channel options, health
and reflection, per-request error statuses, and graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from pagewire.services.common.config import ServiceConfig
from pagewire.services.common.errors import Refusal, RequestError
from pagewire.services.common.logging import get_logger
from pagewire.services.common.message_guard import MalformedMessageInterceptor

# Shared by the services: each line names the service of the process.
log = get_logger()

# Clients may ping every 10 s: long generations send no data frames for a
# while, and the 300 s server default makes gRPC close such connections.
KEEPALIVE_SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]
KEEPALIVE_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return message_size_options(max_message_bytes) + KEEPALIVE_CHANNEL_OPTIONS


# The one table from a transport-neutral refusal to its gRPC status code.
GRPC_CODES: dict[Refusal, grpc.StatusCode] = {kind: getattr(grpc.StatusCode, kind.name) for kind in Refusal}
REFUSALS: dict[grpc.StatusCode, Refusal] = {code: kind for kind, code in GRPC_CODES.items()}


def grpc_code(error: RequestError) -> grpc.StatusCode:
    return GRPC_CODES[error.kind]


def to_status(error: RequestError) -> status_pb2.Status:
    """The error as a google.rpc.Status; a field at fault travels as a
    google.rpc.BadRequest detail naming it."""
    status = error_status(grpc_code(error), error.message)
    if error.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return status


def violated_field(status: status_pb2.Status) -> str | None:
    """The field a google.rpc.BadRequest detail of `status` names, if any."""
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request) and bad_request.field_violations:
            return bad_request.field_violations[0].field
    return None


def refusal_of(code: grpc.StatusCode) -> Refusal:
    return REFUSALS.get(code, Refusal.UNKNOWN)


def error_from_status(status: status_pb2.Status) -> RequestError:
    """An in-band google.rpc.Status back into a RequestError."""
    return RequestError(refusal_of(status_code(status)), status.message, violated_field(status))


def error_status(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code.value[0], message=message)


def status_code(status: status_pb2.Status) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    service_names: list[str]
    port: int

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def drain_and_stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish for up to grace_s, then stop."""
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_server(
    host: str,
    port: int,
    max_message_bytes: int,
    register: Iterable[Callable[[grpc.aio.Server], None]],
    service_names: list[str],
    handler_threads: int | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    options: Sequence[tuple[str, int]] = (),
    health: health_aio.HealthServicer | None = None,
) -> RunningServer:
    """Start a grpc.aio server with health (liveness "" and readiness per
    service name; `health`, or a plain HealthServicer) and reflection. Health
    starts NOT_SERVING for the named services; call `set_serving(True)` once
    the service is ready.
    `handler_threads` sizes the pool that runs synchronous handlers (each open
    stream of a synchronous handler holds one thread). `interceptors` (e.g.
    API keys) and `credentials` (TLS) are for the public port; `options`
    are more server options (SO_REUSEPORT for processes sharing a port)."""
    pool = ThreadPoolExecutor(max_workers=handler_threads) if handler_threads else None
    server = grpc.aio.server(
        migration_thread_pool=pool,
        interceptors=[*interceptors, MalformedMessageInterceptor()],
        options=message_size_options(max_message_bytes) + KEEPALIVE_SERVER_OPTIONS + list(options),
    )
    for add in register:
        add(server)
    health = health if health is not None else health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound_port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if bound_port == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in service_names:
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return RunningServer(server, health, service_names, bound_port)


async def start_service_server(
    config: ServiceConfig,
    register: Callable[[grpc.aio.Server], None],
    service_name: str,
    *,
    handler_threads: int | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    options: Sequence[tuple[str, int]] = (),
    health: health_aio.HealthServicer | None = None,
) -> RunningServer:
    """start_server for one pagewire service, on the address and message size of its config."""
    return await start_server(
        config.host, config.port, config.max_message_bytes, [register], [service_name],
        handler_threads=handler_threads, interceptors=interceptors, credentials=credentials, options=options, health=health,
    )  # fmt: skip


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, on the running loop: the one way a
    service learns that it is asked to stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_until_signalled(running: RunningServer, grace_s: float = 10.0) -> None:
    """Block until SIGINT/SIGTERM (then drain) or until the server stops."""
    stop = stop_on_signals()
    waiter = asyncio.ensure_future(running.server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("draining", grace_s=grace_s)
        await running.drain_and_stop(grace_s)
    waiter.cancel()
    stopper.cancel()


def check_health(target: str, service: str = "", timeout_s: float = 3.0, root_certificates: bytes | None = None) -> bool:
    """True when `target` answers grpc.health.v1 Check with SERVING; over TLS
    when `root_certificates` (PEM) are given."""
    if root_certificates is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root_certificates))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
