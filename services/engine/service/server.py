"""`pagewire engine`: the Engine gRPC service. Cheap to import (torch loads
inside `serve`), because the CLI imports it to build --help."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pagewire.services.common.grpc_utils import RunningServer, serve_until_signalled, start_service_server
from pagewire.services.common.logging import get_logger
from pagewire.services.engine.config import EngineConfig

if TYPE_CHECKING:
    from pagewire.services.engine.service.servicer import CoreHandle, EngineServicer

CONFIG = EngineConfig

log = get_logger("engine")


async def start_engine_server(config: EngineConfig) -> tuple[RunningServer, EngineServicer]:
    """Bind and start answering health (NOT_SERVING for the Engine until attach)."""
    from pagewire.v1 import engine_pb2_grpc
    from pagewire.services.engine.service.servicer import SERVICE_NAME, EngineServicer

    servicer = EngineServicer(config.max_message_bytes)
    running = await start_service_server(config, lambda server: engine_pb2_grpc.add_EngineServicer_to_server(servicer, server), SERVICE_NAME)
    return running, servicer


async def attach_core(running: RunningServer, servicer: EngineServicer, core: CoreHandle) -> None:
    servicer.attach(core)
    await running.set_serving(True)
    log.info("engine serving", port=running.port, model_id=core.info.model_id, device=core.info.device)


async def serve(config: EngineConfig) -> int:
    from pagewire.services.common.model import resolve_model
    from pagewire.services.engine.service.core_process import CoreProcess, CoreProcessError

    resolve_model(config.model)  # a missing model fails before the port opens
    running, servicer = await start_engine_server(config)
    log.info("engine loading model", port=running.port, model=config.model or "embedded")
    event_loop = asyncio.get_running_loop()

    def stop_serving() -> None:
        # Without its core the server has nothing to offer; exiting lets a supervisor start a fresh one.
        event_loop.call_soon_threadsafe(lambda: asyncio.ensure_future(running.server.stop(None)))

    core = CoreProcess(config, on_lost=stop_serving)
    try:
        try:
            await asyncio.to_thread(core.start)
        except CoreProcessError as exc:
            # A model that cannot be served (an unsupported architecture, a broken checkpoint): the reason, without a traceback.
            log.error("engine stopped: the model did not load", reason=str(exc))
            return 1
        await attach_core(running, servicer, core)
        await serve_until_signalled(running, config.shutdown_grace_s)
    finally:
        await running.server.stop(None)
        servicer.stop()
    if core.error is not None:
        log.error("engine stopped: its core failed", reason=str(core.error))
        return 1
    return 0
