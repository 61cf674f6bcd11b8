"""structlog setup shared by every service: JSON lines when stderr is not a
terminal, readable console output when it is; records of standard-library
loggers (uvicorn, asyncio, grpc) come out the same way. Bind the request id
with `logger.bind(request_id=...)` on multiplexed streams."""

from __future__ import annotations

import logging
import sys

import structlog

_stdlib_handler: logging.Handler | None = None


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
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


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(service=name)
