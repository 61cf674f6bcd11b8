"""The model-server metrics protocol on the gateway's /metrics (vLLM's names,
which the Kubernetes inference gateways' endpoint picker reads): the same
figures as pagewire's own gauges, for the pod as a whole, and, under
`pagewire serve` with requests running and waiting, the engine's own Stats."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagewire.services.gateway.metrics import GatewayMetrics
from pagewire.v1 import engine_pb2, engine_pb2_grpc
from tests.support.harness import ServeProcess, engine_stats, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

NO_LORA = (("max_lora", "0"), ("running_lora_adapters", ""), ("waiting_lora_adapters", ""))

# Two sequences run at a time, so most of the requests wait. A block holds a
# whole request (prompt and output), so the load changes only when a request
# is admitted or finishes: it stays put for seconds at a time, long enough
# for an engine Stats call before and after a scrape to agree.
MAX_NUM_SEQS = 2
BLOCK_SIZE = 256
NUM_KV_BLOCKS = 8
REQUESTS = 6
MAX_TOKENS = 48
# Scrapes under load compared with the engine (its figures held still), at least.
COMPARED_SCRAPES = 3
# Between scrapes, leaving the CPU to the engine.
POLL_S = 0.1


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def info(block_size: int, num_kv_blocks: int) -> engine_pb2.EngineInfo:
    return engine_pb2.EngineInfo(model_id="m", block_size=block_size, num_kv_blocks=num_kv_blocks)


def test_pod_figures_sum_the_replicas_and_weigh_kv_use_by_cache_size() -> None:
    metrics = GatewayMetrics()
    before = time.time()
    metrics.observe_stats("a:1", engine_pb2.EngineStats(load=engine_pb2.EngineLoad(num_running=3, num_waiting=2, kv_cache_usage=0.5)), info(16, 100))
    metrics.observe_stats("b:1", engine_pb2.EngineStats(load=engine_pb2.EngineLoad(num_running=1, num_waiting=0, kv_cache_usage=0.25)), info(16, 300))
    metrics.observe_stats("c:1", engine_pb2.EngineStats(load=engine_pb2.EngineLoad(num_running=0, num_waiting=4, kv_cache_usage=0.0)), info(32, 50))
    # A step's load after the Stats: the newer figures count.
    metrics.observe_load("a:1", engine_pb2.EngineLoad(num_running=2, num_waiting=3, kv_cache_usage=0.5))
    after = time.time()
    got = parse(metrics.render().decode())

    assert series(got, "vllm:num_requests_running") == {(): 2 + 1 + 0}
    assert series(got, "vllm:num_requests_waiting") == {(): 3 + 0 + 4}
    assert series(got, "vllm:kv_cache_usage_perc") == {(): (0.5 * 100 + 0.25 * 300) / (100 + 300 + 50)}
    assert series(got, "vllm:cache_config_info") == {
        (("block_size", "16"), ("num_gpu_blocks", "400")): 1,
        (("block_size", "32"), ("num_gpu_blocks", "50")): 1,
    }
    ((labels, updated_at),) = series(got, "vllm:lora_requests_info").items()
    assert labels == NO_LORA
    assert before <= updated_at <= after

    metrics.forget_replica("a:1")
    metrics.forget_replica("c:1")
    got = parse(metrics.render().decode())
    assert series(got, "vllm:num_requests_running") == {(): 1}
    assert series(got, "vllm:num_requests_waiting") == {(): 0}
    assert series(got, "vllm:kv_cache_usage_perc") == {(): 0.25}
    assert series(got, "vllm:cache_config_info") == {(("block_size", "16"), ("num_gpu_blocks", "300")): 1}


def test_kv_use_leaves_out_a_replica_of_unknown_size() -> None:
    metrics = GatewayMetrics()
    metrics.observe_stats("a:1", engine_pb2.EngineStats(load=engine_pb2.EngineLoad(num_running=1, kv_cache_usage=0.5)), info(16, 100))
    metrics.observe_load("b:1", engine_pb2.EngineLoad(num_running=1, kv_cache_usage=1.0))
    got = parse(metrics.render().decode())
    assert series(got, "vllm:num_requests_running") == {(): 2}
    assert series(got, "vllm:kv_cache_usage_perc") == {(): 0.5}


def test_before_any_engine_reports_the_pod_is_idle_with_no_cache_or_lora_series() -> None:
    got = parse(GatewayMetrics().render().decode())
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert series(got, name) == {(): 0}, name
    assert series(got, "vllm:cache_config_info") == {}
    assert series(got, "vllm:lora_requests_info") == {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    serve = ServeProcess(
        ["--device", "cpu", "--max-num-seqs", str(MAX_NUM_SEQS), "--block-size", str(BLOCK_SIZE), "--num-kv-blocks", str(NUM_KV_BLOCKS)],
        log_path=tmp_path_factory.mktemp("serve") / "serve.log",
    )
    with serve.running():
        yield serve


def scrape(server: ServeProcess) -> Samples:
    response = httpx.get(f"{server.rest_url}/metrics", timeout=30)
    response.raise_for_status()
    return parse(response.text)


def engine_figures(stats: engine_pb2.EngineStats) -> tuple[int, int, float, int]:
    return stats.load.num_running, stats.load.num_waiting, stats.load.kv_cache_usage, stats.num_total_blocks


def assert_agrees_with_engine(samples: Samples, stats: engine_pb2.EngineStats, engine_info: engine_pb2.EngineInfo, replica: str) -> None:
    """Each protocol figure equals the engine's own, and pagewire's gauge of the same meaning."""
    running, waiting, kv_usage, total_blocks = engine_figures(stats)
    own = (("replica", replica),)
    assert samples[("vllm:num_requests_running", ())] == running == samples[("pagewire_requests_running", own)]
    assert samples[("vllm:num_requests_waiting", ())] == waiting == samples[("pagewire_requests_waiting", own)]
    assert samples[("vllm:kv_cache_usage_perc", ())] == kv_usage == samples[("pagewire_kv_cache_usage_ratio", own)]
    assert (total_blocks - stats.num_free_blocks) / total_blocks == pytest.approx(kv_usage)
    assert series(samples, "vllm:cache_config_info") == {(("block_size", str(engine_info.block_size)), ("num_gpu_blocks", str(total_blocks))): 1}


def test_metrics_under_load_match_the_engines_own_stats(server: ServeProcess) -> None:
    with grpc.insecure_channel(server.engine_target) as channel:
        engine_info = engine_pb2_grpc.EngineStub(channel).Info(engine_pb2.EngineInfoRequest(), timeout=10)
    assert (engine_info.block_size, engine_info.num_kv_blocks) == (BLOCK_SIZE, NUM_KV_BLOCKS)

    def complete(index: int) -> None:
        body = {"prompt": f"Count from {index} upwards:", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{server.rest_url}/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS

    compared: list[tuple[int, int, float, int]] = []
    raced = 0
    previous: tuple[int, int, float, int] | None = None
    with ThreadPoolExecutor(REQUESTS) as pool:
        requests = [pool.submit(complete, index) for index in range(REQUESTS)]
        wait_until(lambda: engine_stats(server.engine_target).load.num_waiting > 0, "requests wait in the engine", timeout_s=60)
        while not all(request.done() for request in requests):
            time.sleep(POLL_S)
            before = engine_stats(server.engine_target)
            scrape_started = time.time()
            samples = scrape(server)
            scrape_ended = time.time()
            after = engine_stats(server.engine_target)
            # Compared only when the engine held still from the last poll to
            # after the scrape: a step the gateway had yet to read when the
            # scrape's Stats answered may show a state just before `before`.
            steady = previous == engine_figures(before) == engine_figures(after)
            previous = engine_figures(after)
            if not steady:
                raced += 1
                continue
            assert_agrees_with_engine(samples, before, engine_info, server.engine_target)
            ((labels, updated_at),) = series(samples, "vllm:lora_requests_info").items()
            assert labels == NO_LORA
            assert scrape_started <= updated_at <= scrape_ended
            compared.append(engine_figures(before))
        for request in requests:
            request.result()

    busy = [figures for figures in compared if figures[0] > 0]
    assert len(busy) >= COMPARED_SCRAPES, f"{len(busy)} scrapes under load were compared with the engine, {raced} raced a change"
    assert any(waiting > 0 and kv_usage > 0 for _, waiting, kv_usage, _ in busy), busy

    wait_until(lambda: engine_figures(engine_stats(server.engine_target))[:3] == (0, 0, 0.0), "the engine is idle", timeout_s=30)
    idle = engine_stats(server.engine_target)
    assert_agrees_with_engine(scrape(server), idle, engine_info, server.engine_target)
