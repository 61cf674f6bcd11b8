"""Faults: a peer of the gateway dies under running requests, or the gateway
itself is told to stop.

- kill -9 the engine, then the tokenizer, then the engine's core process,
  mid-stream: every in-flight request ends promptly with UNAVAILABLE (an
  error event in the SSE stream, the RPC status on gRPC), new requests get
  503 at once while the peer is away, and once it is restarted the gateway
  reconnects by itself and serves again. An engine that loses its core
  exits with code 1 by itself, for its supervisor to restart.
- A request in token ids both ways (token_ids_only) never needs the
  tokenizer, so its going down mid-stream does not end it.
- SIGTERM the gateway during requests: it drains (every running request
  finishes normally) and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil

from pagewire.v1 import common_pb2, gateway_pb2
from tests.reliability.clients import GrpcResult, Outcome, StreamResult, completion_body, grpc_complete, rest_client, stream_completion
from tests.reliability.settings import ENGINE_ARGS, GATEWAY_ARGS, TOKENIZER_ARGS
from tests.support.harness import Cluster, ServiceProcess

IN_FLIGHT_REST = 8
IN_FLIGHT_GRPC = 2
# An in-flight request must end this soon after its peer dies.
FAIL_FAST_S = 10.0
# A request arriving while a peer is away must be refused this soon.
REFUSE_FAST_S = 5.0
RECONNECT_TIMEOUT_S = 60.0


def _grpc_request(max_tokens: int) -> gateway_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return gateway_pb2.GenerateRequest(text="Write a poem about the sea.", sampling=sampling)


async def _start_in_flight(cluster: Cluster, client: httpx.AsyncClient, max_tokens: int) -> tuple[list[asyncio.Task[Any]], list[asyncio.Task[Any]]]:
    """Requests that have all produced output already."""
    started = [asyncio.Event() for _ in range(IN_FLIGHT_REST + IN_FLIGHT_GRPC)]
    rest = [
        asyncio.create_task(stream_completion(client, completion_body(max_tokens), timeout_s=120.0, first_event=event))
        for event in started[:IN_FLIGHT_REST]
    ]
    over_grpc = [
        asyncio.create_task(grpc_complete(cluster.gateway.address, _grpc_request(max_tokens), timeout_s=120.0, first_chunk=event))
        for event in started[IN_FLIGHT_REST:]
    ]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 90.0)
    return rest, over_grpc


async def _wait_ready(client: httpx.AsyncClient) -> float:
    started = time.monotonic()
    while time.monotonic() - started < RECONNECT_TIMEOUT_S:
        try:
            if (await client.get("/health")).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the gateway did not report ready again")


def _kill_engine_core(engine: ServiceProcess) -> None:
    """kill -9 the engine's core process; the engine server must then exit 1."""
    assert engine.process is not None
    # Beside the core, multiprocessing keeps a resource tracker process.
    (core,) = [child for child in psutil.Process(engine.process.pid).children() if "spawn_main" in " ".join(child.cmdline())]
    core.kill()
    assert engine.process.wait(30) == 1, engine.log_tail()


def _kill_tensor_parallel_rank(engine: ServiceProcess) -> None:
    """kill -9 the worker holding rank 1; the engine server must then exit 1."""
    assert engine.process is not None
    (worker,) = [p for p in psutil.Process(engine.process.pid).children(recursive=True) if "tp_worker" in " ".join(p.cmdline())]
    worker.kill()
    assert engine.process.wait(30) == 1, engine.log_tail()


async def _peer_crash(
    cluster: Cluster, peer: ServiceProcess, kill: Callable[[ServiceProcess], None] = ServiceProcess.kill, restart: bool = True
) -> dict[str, Any]:
    """Kill `peer` under in-flight requests: they fail fast, new ones are
    refused while it is down, and (with restart) it comes back and serves."""
    async with rest_client(cluster.rest_url) as client:
        rest_tasks, grpc_tasks = await _start_in_flight(cluster, client, max_tokens=1000)
        killed_at = time.monotonic()
        kill(peer)
        rest_results: list[StreamResult] = await asyncio.gather(*rest_tasks)
        grpc_results: list[GrpcResult] = await asyncio.gather(*grpc_tasks)
        all_ended_s = time.monotonic() - killed_at

        while_down = await stream_completion(client, completion_body(4), timeout_s=30.0)
        grpc_while_down = await grpc_complete(cluster.gateway.address, _grpc_request(4), timeout_s=30.0)
        gateway_alive_while_down = cluster.gateway.alive

        recovered: dict[str, Any] = {}
        if restart:
            peer.start()
            peer_start_s = peer.wait_serving()
            reconnect_s = await _wait_ready(client)
            after = await stream_completion(client, completion_body(4), timeout_s=60.0)
            grpc_after = await grpc_complete(cluster.gateway.address, _grpc_request(4), timeout_s=60.0)
            assert after.outcome is Outcome.COMPLETED, after
            assert grpc_after.code is grpc.StatusCode.OK and grpc_after.finish_reason == common_pb2.FINISH_REASON_LENGTH, grpc_after
            recovered = {
                "completed_after_restart": 2,
                "seconds_peer_restart": round(peer_start_s, 1),
                "seconds_gateway_reconnect_after_peer_ready": round(reconnect_s, 2),
            }

    assert all(r.outcome is Outcome.UNAVAILABLE for r in rest_results), rest_results
    assert all(r.code is grpc.StatusCode.UNAVAILABLE for r in grpc_results), grpc_results
    assert all_ended_s < FAIL_FAST_S, f"in-flight requests took {all_ended_s:.1f} s to fail"
    assert while_down.http_status == 503 and while_down.elapsed_s < REFUSE_FAST_S, while_down
    assert grpc_while_down.code is grpc.StatusCode.UNAVAILABLE and grpc_while_down.elapsed_s < REFUSE_FAST_S, grpc_while_down
    assert gateway_alive_while_down
    in_flight = len(rest_results) + len(grpc_results)
    return {
        "in_flight_when_killed": in_flight,
        "sent": in_flight + 2 + (2 if restart else 0),
        "failed_unavailable": in_flight + 2,
        "lost": 0,
        "seconds_until_all_in_flight_failed": round(all_ended_s, 2),
        "seconds_to_refuse_while_down": round(max(while_down.elapsed_s, grpc_while_down.elapsed_s), 2),
        **recovered,
    }


def test_engine_killed_mid_stream_fails_fast_and_gateway_reconnects(serving_cluster: Cluster, record_figures) -> None:  # type: ignore[no-untyped-def]
    record_figures(asyncio.run(_peer_crash(serving_cluster, serving_cluster.engine)))


def test_engine_core_process_killed_mid_stream_fails_fast_and_engine_exits(serving_cluster: Cluster, record_figures) -> None:  # type: ignore[no-untyped-def]
    record_figures(asyncio.run(_peer_crash(serving_cluster, serving_cluster.engine, kill=_kill_engine_core)))


def test_tensor_parallel_rank_killed_mid_stream_fails_fast_and_engine_exits(tmp_path: Path, record_figures) -> None:  # type: ignore[no-untyped-def]
    # An engine of its own, split over two CPU ranks (gloo). What is new
    # here is a rank's death ending the engine; its restart is a new engine
    # process, as in the engine-killed test, so it is not repeated.
    engine_args = [*ENGINE_ARGS, "--tensor-parallel-size", "2"]
    with Cluster.create(tmp_path, tokenizer_args=TOKENIZER_ARGS, engine_args=engine_args, gateway_args=GATEWAY_ARGS).running() as cluster:
        record_figures(asyncio.run(_peer_crash(cluster, cluster.engine, kill=_kill_tensor_parallel_rank, restart=False)))


def test_tokenizer_killed_mid_stream_fails_fast_and_gateway_reconnects(serving_cluster: Cluster, record_figures) -> None:  # type: ignore[no-untyped-def]
    record_figures(asyncio.run(_peer_crash(serving_cluster, serving_cluster.tokenizer)))


def test_a_request_in_token_ids_both_ways_outlives_the_tokenizer(serving_cluster: Cluster) -> None:
    """Its prompt given as ids and its output asked as ids (token_ids_only),
    a request never needs the tokenizer: its going down mid-stream does not
    end the request."""
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    request = gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=list(range(100, 132))), sampling=sampling, token_ids_only=True)

    async def scenario() -> GrpcResult:
        first = asyncio.Event()
        call = asyncio.create_task(grpc_complete(serving_cluster.gateway.address, request, timeout_s=120.0, first_chunk=first))
        await asyncio.wait_for(first.wait(), 90.0)
        serving_cluster.tokenizer.kill()
        result = await call
        serving_cluster.tokenizer.start()
        serving_cluster.tokenizer.wait_serving()
        async with rest_client(serving_cluster.rest_url) as client:
            await _wait_ready(client)
        return result

    result = asyncio.run(scenario())
    assert result.code is grpc.StatusCode.OK and result.finish_reason == common_pb2.FINISH_REASON_LENGTH, result


async def _gateway_sigterm(cluster: Cluster) -> dict[str, Any]:
    async with rest_client(cluster.rest_url) as client:
        rest_tasks, grpc_tasks = await _start_in_flight(cluster, client, max_tokens=48)
        signalled_at = time.monotonic()
        cluster.gateway.signal(signal.SIGTERM)
        rest_results: list[StreamResult] = await asyncio.gather(*rest_tasks)
        grpc_results: list[GrpcResult] = await asyncio.gather(*grpc_tasks)
    exit_code = await asyncio.to_thread(cluster.gateway.process.wait, 60)  # type: ignore[union-attr]
    stopped_s = time.monotonic() - signalled_at
    rest_completed = [r for r in rest_results if r.outcome is Outcome.COMPLETED and r.finish_reason == "length"]
    grpc_completed = [r for r in grpc_results if r.code is grpc.StatusCode.OK and r.finish_reason == common_pb2.FINISH_REASON_LENGTH]
    sent = len(rest_results) + len(grpc_results)
    assert len(rest_completed) == len(rest_results), rest_results
    assert len(grpc_completed) == len(grpc_results), grpc_results
    assert exit_code == 0, cluster.gateway.log_tail()
    return {
        "in_flight_when_signalled": sent,
        "completed": len(rest_completed) + len(grpc_completed),
        "lost": sent - len(rest_completed) - len(grpc_completed),
        "gateway_exit_code": exit_code,
        "seconds_to_drain_and_exit": round(stopped_s, 2),
    }


def test_gateway_sigterm_drains_running_requests(serving_cluster: Cluster, record_figures) -> None:  # type: ignore[no-untyped-def]
    record_figures(asyncio.run(_gateway_sigterm(serving_cluster)))
