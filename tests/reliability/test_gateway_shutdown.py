"""SIGTERM to a gateway of its own (in front of the shared tokenizer and
engine): both front doors close at once and the requests running on either
share one grace period.

- A REST stream is running: a new REST request gets 503 with the OpenAI error
  body, REST /health is 503, gRPC readiness is not SERVING; the running stream
  completes and the gateway exits 0 within the grace period.
- A REST stream and a gRPC stream both outlast the grace period: the gateway
  exits at its end, not after a second grace period for REST.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pagewire.services.common.grpc_utils import check_health
from pagewire.v1 import common_pb2, gateway_pb2
from tests.reliability.clients import Outcome, completion_body, grpc_complete, rest_client, stream_completion
from tests.support.harness import Cluster, ServiceProcess

# Seconds the gateway may take beyond its grace period to stop both servers.
EXIT_MARGIN_S = 3.0


@pytest.fixture
def start_gateway(serving_cluster: Cluster, tmp_path: Path) -> Iterator[Callable[[float], ServiceProcess]]:
    """Start a gateway with the given grace period."""
    started: list[ServiceProcess] = []

    def start(grace_s: float) -> ServiceProcess:
        gateway = ServiceProcess(
            "gateway",
            ["--tokenizer", serving_cluster.tokenizer.address, "--engine", serving_cluster.engine.address, "--shutdown-grace-s", str(grace_s)],
            log_path=tmp_path / "gateway.log",
        )
        gateway.start()
        started.append(gateway)
        gateway.wait_serving()
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


async def _wait_not_serving(gateway: ServiceProcess, timeout_s: float = 5.0) -> None:
    """Until gRPC readiness is not SERVING: the gateway has taken the signal."""
    deadline = time.monotonic() + timeout_s
    while await asyncio.to_thread(check_health, gateway.address, gateway.readiness_service, 1.0):
        assert time.monotonic() < deadline, "gRPC readiness still SERVING after SIGTERM"
        await asyncio.sleep(0.05)


async def _refuses_and_drains(gateway: ServiceProcess, grace_s: float) -> dict[str, Any]:
    async with rest_client(gateway.rest_url) as client:
        first_event = asyncio.Event()
        running = asyncio.create_task(stream_completion(client, completion_body(64), timeout_s=120.0, first_event=first_event))
        await asyncio.wait_for(first_event.wait(), 60.0)
        signalled_at = time.monotonic()
        gateway.signal(signal.SIGTERM)
        await _wait_not_serving(gateway)
        # A fresh connection, as a client arriving now would open.
        async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=10.0) as newcomer:
            refused = await newcomer.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
            health = await newcomer.get("/health")
        refused_while_running = not running.done()
        readiness_after = await asyncio.to_thread(check_health, gateway.address, gateway.readiness_service, 1.0)
        result = await running
    exit_code = await asyncio.to_thread(gateway.process.wait, grace_s + 30)  # type: ignore[union-attr]
    stopped_s = time.monotonic() - signalled_at

    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "service_unavailable_error" and error["code"] == "UNAVAILABLE", error
    assert "shutting down" in error["message"], error
    assert refused.headers["connection"] == "close"
    assert health.status_code == 503 and "shutting down" in health.json()["error"]["message"], health.text
    assert refused_while_running, "the running stream ended before the new request was refused: the test proves nothing"
    assert not readiness_after
    assert result.outcome is Outcome.COMPLETED and result.finish_reason == "length", result
    assert exit_code == 0, gateway.log_tail()
    assert stopped_s < grace_s + EXIT_MARGIN_S, f"stopped {stopped_s:.1f} s after SIGTERM (grace {grace_s} s)"
    return {"seconds_to_drain_and_exit": round(stopped_s, 2), "refused_status": refused.status_code, "health_status": health.status_code}


def test_sigterm_refuses_new_rest_requests_and_drains_the_running_one(start_gateway, record_figures) -> None:  # type: ignore[no-untyped-def]
    grace_s = 20.0
    record_figures(asyncio.run(_refuses_and_drains(start_gateway(grace_s), grace_s)))


async def _one_grace_period(gateway: ServiceProcess, grace_s: float) -> dict[str, Any]:
    long_request = gateway_pb2.GenerateRequest(
        text="Write a long story.", sampling=common_pb2.SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
    )
    async with rest_client(gateway.rest_url) as client:
        started = [asyncio.Event(), asyncio.Event()]
        rest = asyncio.create_task(stream_completion(client, completion_body(1500), timeout_s=120.0, first_event=started[0]))
        over_grpc = asyncio.create_task(grpc_complete(gateway.address, long_request, timeout_s=120.0, first_chunk=started[1]))
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 60.0)
        signalled_at = time.monotonic()
        gateway.signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(gateway.process.wait, 3 * grace_s + 30)  # type: ignore[union-attr]
        stopped_s = time.monotonic() - signalled_at
        rest_result, grpc_result = await asyncio.gather(rest, over_grpc)
    assert stopped_s < grace_s + EXIT_MARGIN_S, f"stopped {stopped_s:.1f} s after SIGTERM (grace {grace_s} s)"
    assert exit_code == 0, gateway.log_tail()
    # Cut off at the end of the grace period, not completed.
    assert rest_result.outcome is not Outcome.COMPLETED, rest_result
    assert grpc_result.finish_reason != common_pb2.FINISH_REASON_LENGTH, grpc_result
    return {"seconds_to_exit": round(stopped_s, 2), "grace_s": grace_s, "grpc_code": grpc_result.code.name, "rest_detail": rest_result.detail}


def test_grpc_and_rest_requests_share_one_grace_period(start_gateway, record_figures) -> None:  # type: ignore[no-untyped-def]
    grace_s = 4.0
    record_figures(asyncio.run(_one_grace_period(start_gateway(grace_s), grace_s)))
