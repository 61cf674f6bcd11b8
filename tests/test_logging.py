"""pagewire.services.common.logging as configured for a service whose stderr is a pipe
(a container, a supervisor): its real output, read back and parsed."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import structlog

from pagewire.services.common.logging import configure_logging, get_logger
from tests.support.harness import ServiceProcess


class TtyStream(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put structlog's and the root logger's set-up back so later tests log as before."""
    saved_config, root = structlog.get_config(), logging.getLogger()
    saved_handlers = list(root.handlers)
    yield
    structlog.contextvars.clear_contextvars()
    structlog.configure(**saved_config)
    root.handlers[:] = saved_handlers


def _configure(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO) -> io.StringIO:
    """configure_logging with `stream` as stderr. Patched inside the test:
    pytest swaps its own capture back onto sys.stderr when a test starts."""
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info")
    return stream


def _records(stream: io.StringIO) -> list[dict]:
    """Every line must be one JSON object."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_off_a_tty_every_line_is_a_json_object_with_level_time_event_and_service(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _configure(monkeypatch, io.StringIO())  # a StringIO is no TTY
    log = get_logger("engine")
    log.info("engine ready", num_kv_blocks=3)
    log.debug("below the level")
    try:
        raise RuntimeError("step failed")
    except RuntimeError:
        log.exception("engine step loop failed")
    ready, failed = _records(stderr)
    assert ready["event"] == "engine ready" and ready["level"] == "info" and ready["service"] == "engine"
    assert ready["num_kv_blocks"] == 3
    stamp = datetime.fromisoformat(ready["timestamp"])
    assert stamp.utcoffset() == timedelta(0), "timestamps are UTC"
    # The traceback stays inside its JSON line.
    assert failed["level"] == "error" and "RuntimeError: step failed" in failed["exception"]


def test_a_bound_request_id_is_on_every_line_logged_while_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _configure(monkeypatch, io.StringIO())  # a StringIO is no TTY
    engine, gateway = get_logger("engine"), get_logger("gateway")
    with structlog.contextvars.bound_contextvars(request_id="req-7"):
        engine.info("request added")
        gateway.info("first token")
    engine.info("idle")
    # The gateway's per-request logger binds it on the logger instead.
    request_log = gateway.bind(request_id="req-8")
    request_log.info("started")
    request_log.warning("cancelled by the client")
    added, first, idle, started, cancelled = _records(stderr)
    assert added["request_id"] == first["request_id"] == "req-7"
    assert (added["service"], first["service"]) == ("engine", "gateway")
    assert "request_id" not in idle
    assert started["request_id"] == cancelled["request_id"] == "req-8" and cancelled["level"] == "warning"


def test_standard_library_records_are_json_lines_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # uvicorn (the REST shim), asyncio and grpc log through the logging module.
    stderr = _configure(monkeypatch, io.StringIO())
    try:
        raise ValueError("bad body")
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    (record,) = _records(stderr)
    assert record["event"] == "Exception in ASGI application" and record["level"] == "error"
    assert record["logger"] == "uvicorn.error" and "timestamp" in record
    assert "ValueError: bad body" in record["exception"]


def test_on_a_tty_the_output_is_for_people(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _configure(monkeypatch, TtyStream())
    get_logger("tokenizer").info("tokenizer ready", port=50052)
    (line,) = terminal.getvalue().splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    assert "tokenizer ready" in line and "port=50052" in line and "service=tokenizer" in line


@pytest.mark.parametrize(
    ("service", "args"),
    [("tokenizer", []), ("engine", ["--device", "cpu", "--num-kv-blocks", "64", "--max-model-len", "512"])],
)
def test_every_line_of_a_service_names_it_through_its_drain(tmp_path: Path, service: str, args: list[str]) -> None:
    # The drain is logged by the gRPC helper every service shares, the other
    # lines by the service's own modules and the standard-library loggers.
    child = ServiceProcess(service, log_path=tmp_path / f"{service}.log", args=args)
    with child.running():
        pass
    assert child.process is not None and child.process.returncode == 0, child.log_tail()
    records = [json.loads(line) for line in child.log_path.read_text().splitlines() if line.startswith("{")]
    (draining,) = [record for record in records if record["event"] == "draining"]
    assert draining["service"] == service
    assert {record.get("service") for record in records} == {service}, child.log_tail()
