"""`pagewire serve` supervises its children: kill -9 its engine and it logs
why the child ended, starts it again, and the gateway (which stays up) serves
new requests once the engine is back, with no restart of anything else."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.harness import ServeProcess

ENGINE_ARGS = ["--device", "cpu", "--num-kv-blocks", "128", "--max-model-len", "1024"]
RECOVERY_TIMEOUT_S = 180.0


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    with ServeProcess(ENGINE_ARGS, log_path=tmp_path / "serve.log").running() as running:
        yield running


def _completes(rest_url: str) -> bool:
    try:
        reply = httpx.post(f"{rest_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30.0)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200


def _engine_pids(serve: ServeProcess) -> list[int]:
    return [record["pid"] for record in serve.events("started") if record["child"] == "engine"]


def test_serve_restarts_a_killed_engine_and_says_why(serve: ServeProcess, record_figures) -> None:  # type: ignore[no-untyped-def]
    assert _completes(serve.rest_url)
    (first_engine,) = _engine_pids(serve)
    gateway_pids = [record["pid"] for record in serve.events("started") if record["child"] == "gateway"]
    os.kill(first_engine, signal.SIGKILL)
    killed_at = time.monotonic()

    serve.wait_until(lambda: len(_engine_pids(serve)) == 2, "the engine's restart", RECOVERY_TIMEOUT_S)
    (exited,) = [record for record in serve.events("child exited") if record["child"] == "engine"]
    assert exited["exit_code"] == -signal.SIGKILL
    (restarting,) = [record for record in serve.events("restarting child") if record["child"] == "engine"]
    serve.wait_until(lambda: _completes(serve.rest_url), "a completion after the restart", RECOVERY_TIMEOUT_S)
    recovered_s = time.monotonic() - killed_at
    # Only the engine was started again.
    assert [record["pid"] for record in serve.events("started") if record["child"] == "gateway"] == gateway_pids
    record_figures(
        {
            "engine_killed": 1,
            "engine_restarted": len(_engine_pids(serve)) - 1,
            "logged_exit_code": exited["exit_code"],
            "restart_delay_s": restarting["in_s"],
            "seconds_from_kill_to_completed_request": round(recovered_s, 1),
            "lost": 0,
        }
    )
