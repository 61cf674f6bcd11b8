"""`pagewire serve --gateway-workers 2 --tokenizer-workers 2`: two gateway
processes on one pair of public ports and two tokenizer processes, behaving
as one server. One serve for the module (the drain test ends it):

- health: gRPC readiness and REST /health of the shared ports;
- the API key is required by every worker;
- requests on fresh connections land on both workers, and /metrics on any
  worker counts them all;
- --max-concurrent-requests bounds the whole server: with the bound in
  flight, new requests are refused on every worker, and admitted again once
  those end;
- a worker killed outright is started again, and the server goes on;
- SIGTERM drains both workers: a running stream completes, and serve exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Iterator

import grpc
import httpx
import psutil
import pytest

from pagewire.services.common.grpc_utils import check_health
from pagewire.v1 import gateway_pb2, gateway_pb2_grpc
from tests.reliability.clients import Outcome, completion_body, metric_values, rest_client, stream_completion
from tests.support.harness import READINESS_SERVICE, ServeProcess

API_KEY = "sk-workers"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_CONCURRENT = 3
WAVES = 4
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    args = ["--gateway-workers", "2", "--tokenizer-workers", "2", "--device", "cpu", "--num-kv-blocks", "256", "--max-model-len", "512"]
    args += ["--max-concurrent-requests", str(MAX_CONCURRENT), "--shutdown-grace-s", "20", "--api-key", API_KEY]
    process = ServeProcess(args, log_path=tmp_path_factory.mktemp("workers") / "serve.log")
    with process.running():
        yield process


def test_health_on_the_shared_ports(serve: ServeProcess) -> None:
    assert check_health(serve.grpc_target, READINESS_SERVICE["gateway"])
    assert httpx.get(f"{serve.rest_url}/health").status_code == 200
    # Both tokenizer workers were probed before serve said it was serving.
    assert {record["child"] for record in serve.events("ready")} >= {"tokenizer-0", "tokenizer-1", "engine", "gateway"}
    assert sorted(record["worker"] for record in serve.events("gateway listening", "gateway")) == [0, 1]


def test_every_worker_requires_the_api_key(serve: ServeProcess) -> None:
    # Fresh connections, so that both workers are asked.
    statuses = {httpx.get(f"{serve.rest_url}/v1/models").status_code for _ in range(8)}
    assert statuses == {401}
    with grpc.insecure_channel(serve.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            gateway_pb2_grpc.GenerationStub(channel).ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def _wave(serve: ServeProcess) -> list[Outcome]:
    """MAX_CONCURRENT requests at once, each on a connection of its own."""

    async def one(index: int) -> Outcome:
        async with rest_client(serve.rest_url, AUTH) as client:
            result = await stream_completion(client, completion_body(4, prompt=f"Request {index} of a wave:"), TIMEOUT_S)
            return result.outcome

    return await asyncio.gather(*(one(index) for index in range(MAX_CONCURRENT)))


def test_requests_land_on_both_workers_and_metrics_count_the_whole_server(serve: ServeProcess) -> None:
    async def scrape() -> float:
        async with rest_client(serve.rest_url) as client:
            return sum(await metric_values(client, 'pagewire_requests_total{outcome="length"}'))

    async def run() -> tuple[float, list[Outcome], list[float]]:
        before = await scrape()
        outcomes = [outcome for _ in range(WAVES) for outcome in await _wave(serve)]
        return before, outcomes, [await scrape() for _ in range(6)]

    before, outcomes, after = asyncio.run(run())
    assert outcomes == [Outcome.COMPLETED] * WAVES * MAX_CONCURRENT
    workers = Counter(record["worker"] for record in serve.events("request finished", "gateway"))
    assert set(workers) == {0, 1}, workers
    # Every scrape, whichever worker answers it, counts every request.
    assert after == [before + WAVES * MAX_CONCURRENT] * len(after)


def test_the_concurrency_bound_counts_the_whole_server(serve: ServeProcess) -> None:
    async def run() -> tuple[list[int], list[Outcome]]:
        async with rest_client(serve.rest_url, AUTH) as holder:
            started = [asyncio.Event() for _ in range(MAX_CONCURRENT)]
            running = [asyncio.create_task(stream_completion(holder, completion_body(400), TIMEOUT_S, first_event=event)) for event in started]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), TIMEOUT_S)
            statuses = []
            for _ in range(8):
                # A fresh connection each, so that both workers are asked.
                async with httpx.AsyncClient(base_url=serve.rest_url, headers=AUTH, timeout=30) as newcomer:
                    statuses.append((await newcomer.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})).status_code)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        # The dropped streams leave once their workers see the disconnects.
        for _ in range(20):
            after = await _wave(serve)
            if Outcome.REFUSED not in after:
                break
            await asyncio.sleep(0.5)
        return statuses, after

    statuses, after = asyncio.run(run())
    assert statuses == [429] * len(statuses)
    assert after == [Outcome.COMPLETED] * MAX_CONCURRENT


def test_a_worker_that_dies_is_started_again_and_the_server_goes_on(serve: ServeProcess) -> None:
    (gateway,) = [record["pid"] for record in serve.events("started") if record["child"] == "gateway"]
    workers = {record["child"]: record["pid"] for record in serve.events("started", "gateway")}
    os.kill(workers["gateway-1"], signal.SIGKILL)
    serve.wait_until(lambda: len(serve.events("gateway listening", "gateway")) == 3, "the worker is started again", TIMEOUT_S)
    assert [record["child"] for record in serve.events("restarting child", "gateway")] == ["gateway-1"]
    assert psutil.Process(gateway).is_running()
    # Served again by both: a whole wave fits the bound, so the dead worker's slot is free.
    assert asyncio.run(_wave(serve)) == [Outcome.COMPLETED] * MAX_CONCURRENT


def test_sigterm_drains_both_workers(serve: ServeProcess) -> None:
    async def run() -> Outcome:
        async with rest_client(serve.rest_url, AUTH) as client:
            first = asyncio.Event()
            running = asyncio.create_task(stream_completion(client, completion_body(48), TIMEOUT_S, first_event=first))
            await asyncio.wait_for(first.wait(), TIMEOUT_S)
            serve.signal(signal.SIGTERM)
            return (await running).outcome

    assert asyncio.run(run()) is Outcome.COMPLETED
    assert serve.wait_exit(60) == 0, serve.log_tail()
    stopped = serve.events("gateway stopped", "gateway")
    assert sorted((record["worker"], record["exit_code"]) for record in stopped) == [(0, 0), (1, 0)]
