"""Prometheus metrics of the gateway.

Request-level figures (latencies, token counts, outcomes) are measured here;
engine-level figures (running/waiting sequences, KV cache use, prefix cache
hits) are what each engine replica reports over gRPC (`EngineStep.load` on
every step and the `Stats` RPC), labelled by replica.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagewire.v1 import common_pb2, engine_pb2

# Buckets span a CPU-served small model (seconds per token) to a GPU (ms).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)


def outcome_label(reason: int) -> str:
    """'stop', 'length', 'cancelled', 'error' or 'time_limit'."""
    return common_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


class GatewayMetrics:
    """One registry per gateway, so that several gateways (tests) can coexist."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pagewire_requests", "Finished requests by outcome.", ["outcome"], registry=r)
        self.time_to_first_token = Histogram(
            "pagewire_time_to_first_token_seconds", "Arrival at the gateway to the first output token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.time_per_output_token = Histogram(
            "pagewire_time_per_output_token_seconds", "Mean time between output tokens after the first, per request.", buckets=PER_TOKEN_BUCKETS, registry=r
        )
        self.e2e_latency = Histogram(
            "pagewire_e2e_request_latency_seconds", "Arrival at the gateway to the last chunk.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "pagewire_queue_time_seconds", "Time a request waited in the engine before it was first scheduled.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("pagewire_prompt_tokens", "Prompt tokens of requests sent to an engine.", registry=r)
        self.generation_tokens = Counter("pagewire_generation_tokens", "Output tokens delivered to clients.", registry=r)
        self.requests_running = Gauge("pagewire_requests_running", "Sequences running in the engine.", ["replica"], registry=r)
        self.requests_waiting = Gauge("pagewire_requests_waiting", "Sequences waiting in the engine.", ["replica"], registry=r)
        self.kv_cache_usage = Gauge("pagewire_kv_cache_usage_ratio", "Fraction of KV blocks held by live requests.", ["replica"], registry=r)
        self.prefix_cache_hit = Gauge(
            "pagewire_prefix_cache_hit_ratio", "Prompt tokens found in the prefix cache over those looked up, since engine start.", ["replica"], registry=r
        )

    def observe_finished(
        self,
        reason: int,
        completion_tokens: int,
        e2e_s: float,
        first_token_s: float | None,
        last_token_s: float | None,
    ) -> None:
        """Record one finished request; times are seconds since its arrival."""
        self.requests.labels(outcome_label(reason)).inc()
        self.generation_tokens.inc(completion_tokens)
        self.e2e_latency.observe(e2e_s)
        if first_token_s is not None:
            self.time_to_first_token.observe(first_token_s)
        if last_token_s is not None and first_token_s is not None and completion_tokens > 1:
            self.time_per_output_token.observe((last_token_s - first_token_s) / (completion_tokens - 1))

    def observe_load(self, replica: str, load: engine_pb2.EngineLoad) -> None:
        self.requests_running.labels(replica).set(load.num_running)
        self.requests_waiting.labels(replica).set(load.num_waiting)
        self.kv_cache_usage.labels(replica).set(load.kv_cache_usage)

    def observe_stats(self, replica: str, stats: engine_pb2.EngineStats) -> None:
        self.observe_load(replica, stats.load)
        queried = stats.prefix_cache_queried_tokens
        self.prefix_cache_hit.labels(replica).set(stats.prefix_cache_hit_tokens / queried if queried else 0.0)

    def forget_replica(self, replica: str) -> None:
        """Drop the figures of a replica out of rotation until it reports again."""
        for gauge in (self.requests_running, self.requests_waiting, self.kv_cache_usage, self.prefix_cache_hit):
            with contextlib.suppress(KeyError):
                gauge.remove(replica)

    def render(self) -> bytes:
        return generate_latest(self.registry)
