"""Prometheus exposition of the gateway's figures under their public names."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pagewire.v1 import common_pb2, engine_pb2
from pagewire.services.gateway.metrics import GatewayMetrics


def samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }


def test_request_figures() -> None:
    metrics = GatewayMetrics()
    metrics.prompt_tokens.inc(12)
    # 5 tokens: first at 0.5 s, last at 1.3 s -> 0.2 s per token after the first.
    metrics.observe_finished(common_pb2.FINISH_REASON_STOP, 5, e2e_s=1.4, first_token_s=0.5, last_token_s=1.3)
    metrics.observe_finished(common_pb2.FINISH_REASON_CANCELLED, 0, e2e_s=0.1, first_token_s=None, last_token_s=None)
    metrics.queue_time.observe(0.03)
    got = samples(metrics)
    assert got[("pagewire_requests_total", (("outcome", "stop"),))] == 1
    assert got[("pagewire_requests_total", (("outcome", "cancelled"),))] == 1
    assert got[("pagewire_prompt_tokens_total", ())] == 12
    assert got[("pagewire_generation_tokens_total", ())] == 5
    assert got[("pagewire_time_to_first_token_seconds_count", ())] == 1
    assert got[("pagewire_time_to_first_token_seconds_sum", ())] == 0.5
    assert abs(got[("pagewire_time_per_output_token_seconds_sum", ())] - 0.2) < 1e-9
    assert got[("pagewire_e2e_request_latency_seconds_count", ())] == 2
    assert got[("pagewire_queue_time_seconds_sum", ())] == 0.03


def test_engine_figures_per_replica() -> None:
    metrics = GatewayMetrics()
    metrics.observe_load("a:1", engine_pb2.EngineLoad(num_running=3, num_waiting=2, kv_cache_usage=0.25))
    metrics.observe_stats(
        "b:1",
        engine_pb2.EngineStats(load=engine_pb2.EngineLoad(), prefix_cache_queried_tokens=200, prefix_cache_hit_tokens=150),
    )
    got = samples(metrics)
    assert got[("pagewire_requests_running", (("replica", "a:1"),))] == 3
    assert got[("pagewire_requests_waiting", (("replica", "a:1"),))] == 2
    assert got[("pagewire_kv_cache_usage_ratio", (("replica", "a:1"),))] == 0.25
    assert got[("pagewire_kv_cache_usage_ratio", (("replica", "b:1"),))] == 0
    assert got[("pagewire_prefix_cache_hit_ratio", (("replica", "b:1"),))] == 0.75

    metrics.forget_replica("a:1")
    assert not any(labels == (("replica", "a:1"),) for _, labels in samples(metrics))


def test_no_prefix_lookups_is_a_zero_hit_ratio() -> None:
    metrics = GatewayMetrics()
    metrics.observe_stats("a:1", engine_pb2.EngineStats())
    assert samples(metrics)[("pagewire_prefix_cache_hit_ratio", (("replica", "a:1"),))] == 0


def test_spec_decode_counters_follow_the_engines_stats() -> None:
    metrics = GatewayMetrics()
    stats = engine_pb2.EngineStats(
        spec_decode_draft_tokens_total=40, spec_decode_accepted_tokens_total=25, spec_decode_accepted_tokens_by_position=[10, 8, 7]
    )
    metrics.observe_stats("a:1", stats)
    got = samples(metrics)
    assert got[("pagewire_spec_decode_draft_tokens_total", (("replica", "a:1"),))] == 40
    assert got[("pagewire_spec_decode_accepted_tokens_total", (("replica", "a:1"),))] == 25
    assert got[("pagewire_spec_decode_accepted_tokens_by_position_total", (("position", "2"), ("replica", "a:1")))] == 7
    metrics.forget_replica("a:1")
    assert not any(name.startswith("pagewire_spec_decode") for name, _ in samples(metrics))
