"""`pagewire serve` supervises its children: kill -9 its engine and it logs
why the child ended, starts it again, and the gateway (which stays up) serves
new requests once the engine is back, with no restart of anything else."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.serve_process import ServeProcess

ENGINE_ARGS = ["--device", "cpu", "--num-kv-blocks", "128", "--max-model-len", "1024"]
RECOVERY_TIMEOUT_S = 180.0


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    running = ServeProcess(tmp_path / "serve.log", ENGINE_ARGS)
    running.start()
    try:
        running.wait_serving()
        yield running
    finally:
        running.stop()


def _completes(rest_url: str) -> bool:
    try:
        reply = httpx.post(f"{rest_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30.0)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200


def _wait_for(serve: ServeProcess, description: str, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while not predicate():
        assert serve.process is not None and serve.process.poll() is None, f"pagewire serve exited:\n{serve.log_tail()}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{description} not seen in {RECOVERY_TIMEOUT_S:.0f} s:\n{serve.log_tail()}")
        time.sleep(0.2)


def _engine_pids(serve: ServeProcess) -> list[int]:
    return [record["pid"] for record in serve.events("started") if record["child"] == "engine"]


def test_serve_restarts_a_killed_engine_and_says_why(serve: ServeProcess, record_figures) -> None:  # type: ignore[no-untyped-def]
    assert _completes(serve.rest_url)
    (first_engine,) = _engine_pids(serve)
    gateway_pids = [record["pid"] for record in serve.events("started") if record["child"] == "gateway"]
    os.kill(first_engine, signal.SIGKILL)
    killed_at = time.monotonic()

    _wait_for(serve, "the engine's restart", lambda: len(_engine_pids(serve)) == 2)
    (exited,) = [record for record in serve.events("child exited") if record["child"] == "engine"]
    assert exited["exit_code"] == -signal.SIGKILL
    (restarting,) = [record for record in serve.events("restarting child") if record["child"] == "engine"]
    _wait_for(serve, "a completion after the restart", lambda: _completes(serve.rest_url))
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
