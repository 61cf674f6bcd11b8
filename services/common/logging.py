"""structlog setup shared by every service: JSON lines when stderr is not a
terminal, readable console output when it is; records of standard-library
loggers (uvicorn, asyncio, grpc) come out the same way. Bind the request id
with `logger.bind(request_id=...)` on multiplexed streams.

Each service runs in a process of its own, so the service is a fact of the
process: `configure_logging(service=...)` puts it on every line that does
not name one, which is how the lines of shared helpers (gRPC drain, message
guard, API keys) and of standard-library loggers say whose they are."""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_stdlib_handler: logging.Handler | None = None


def _default_service(service: str) -> Processor:
    def add_service(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", service)
        return event_dict

    return add_service


def configure_logging(level: str = "info", fmt: str = "auto", service: str | None = None) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Processor = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *([_default_service(service)] if service else []),
    ]
    rendering = [structlog.processors.format_exc_info, renderer]
    structlog.configure(
        processors=[*shared, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # uvicorn, asyncio and grpc log through the standard library: without this
    # their records reach stderr as bare text lines between the JSON ones.
    global _stdlib_handler
    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    _stdlib_handler = logging.StreamHandler(sys.stderr)
    _stdlib_handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    root.addHandler(_stdlib_handler)


def get_logger(service: str | None = None) -> structlog.typing.FilteringBoundLogger:
    """A logger whose lines name `service`; without one (code shared by the
    services), the service that configure_logging was given for the process."""
    return structlog.get_logger(service=service) if service else structlog.get_logger()
