"""Prometheus metrics of the gateway.

Request-level figures (latencies, token counts, outcomes) are measured here;
engine-level figures (running/waiting sequences, KV cache use, prefix cache
hits) are what each engine replica reports over gRPC (`EngineStep.load` on
every step and the `Stats` RPC), labelled by replica.

With several gateway workers (PROMETHEUS_MULTIPROC_DIR set, see
workers.py), the request-level figures are prometheus_client's multiprocess
metrics: each worker writes its own to that directory and a scrape of any
worker sums every worker's, those of workers that exited included, so that
totals never go down. The engine-level figures are not summed: every worker
has its own stream to each replica and sees the same load, so the worker
that answers the scrape shows its own view (they are computed at each
scrape from the last figures received, not kept as prometheus Gauges).

The same engine figures are also shown under the model-server metrics
protocol of the Kubernetes Gateway API Inference Extension (vLLM's names,
which endpoint pickers read by default), for the pod as a whole: one series
each, summed over the gateway's replicas (one under `pagewire serve`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagewire.v1 import common_pb2, engine_pb2

# Buckets span a CPU-served small model (seconds per token) to a GPU (ms).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)


def outcome_label(reason: int) -> str:
    """'stop', 'length', 'cancelled', 'error' or 'time_limit'."""
    return common_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


class ModelServerProtocol(Collector):
    """The engines' figures under the protocol's names, computed at each
    scrape from the last load and Info of every replica in rotation. An
    endpoint picker takes the first series of a name, so each is one series
    for the whole pod rather than one per replica."""

    def __init__(self) -> None:
        self._loads: dict[str, engine_pb2.EngineLoad] = {}
        # Known once a replica's Stats were read; it sizes its KV cache.
        self._infos: dict[str, engine_pb2.EngineInfo] = {}
        # Each replica's last Stats, for its LoRA adapters.
        self._stats: dict[str, engine_pb2.EngineStats] = {}
        self._updated_at: float | None = None

    def observe_load(self, replica: str, load: engine_pb2.EngineLoad) -> None:
        self._loads[replica] = load
        self._updated_at = time.time()

    def observe_info(self, replica: str, info: engine_pb2.EngineInfo) -> None:
        self._infos[replica] = info

    def observe_stats(self, replica: str, stats: engine_pb2.EngineStats) -> None:
        self._stats[replica] = stats

    def forget_replica(self, replica: str) -> None:
        self._loads.pop(replica, None)
        self._infos.pop(replica, None)
        self._stats.pop(replica, None)

    def collect(self) -> Iterator[Metric]:
        loads = self._loads.values()
        running = sum(load.num_running for load in loads)
        waiting = sum(load.num_waiting for load in loads)
        yield GaugeMetricFamily("vllm:num_requests_running", "Sequences running in the engines: pagewire_requests_running summed.", value=running)
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Sequences waiting in the engines: pagewire_requests_waiting summed.", value=waiting)

        # The fraction of all the pod's KV blocks in use, so each replica
        # weighs by its cache size; one whose size is not known yet is left out.
        sized = [(load.kv_cache_usage, self._infos[replica].num_kv_blocks) for replica, load in self._loads.items() if replica in self._infos]
        blocks = sum(size for _, size in sized)
        usage = sum(fraction * size for fraction, size in sized) / blocks if blocks else 0.0
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction (0-1) of KV blocks held by live requests: pagewire_kv_cache_usage_ratio.", value=usage)

        cache_config = GaugeMetricFamily(
            "vllm:cache_config_info", "Tokens per KV block and KV blocks in all, one series per block size; value 1.", labels=["block_size", "num_gpu_blocks"]
        )
        blocks_by_size: dict[int, int] = {}
        for info in self._infos.values():
            blocks_by_size[info.block_size] = blocks_by_size.get(info.block_size, 0) + info.num_kv_blocks
        for block_size, num_blocks in sorted(blocks_by_size.items()):
            cache_config.add_metric([str(block_size), str(num_blocks)], 1)
        yield cache_config

        # One series for the pod: the most adapter slots of a replica, and the
        # adapters of its replicas' running and waiting sequences, comma-separated.
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "LoRA adapter slots per engine and the adapters of running and waiting requests; value: Unix time of the engines' last report.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        if self._updated_at is not None:
            stats = self._stats.values()
            max_lora = max((s.max_loras for s in stats), default=0)
            running = sorted({name for s in stats for name in s.running_lora_adapters})
            waiting = sorted({name for s in stats for name in s.waiting_lora_adapters})
            lora.add_metric([str(max_lora), ",".join(running), ",".join(waiting)], self._updated_at)
        yield lora


class ReplicaGauges(Collector):
    """Each replica's last load and prefix cache hit ratio, labelled by replica."""

    def __init__(self) -> None:
        self._loads: dict[str, engine_pb2.EngineLoad] = {}
        self._prefix_hits: dict[str, float] = {}

    def observe_load(self, replica: str, load: engine_pb2.EngineLoad) -> None:
        self._loads[replica] = load

    def observe_prefix_hit(self, replica: str, ratio: float) -> None:
        self._prefix_hits[replica] = ratio

    def forget_replica(self, replica: str) -> None:
        self._loads.pop(replica, None)
        self._prefix_hits.pop(replica, None)

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily("pagewire_requests_running", "Sequences running in the engine.", labels=["replica"])
        waiting = GaugeMetricFamily("pagewire_requests_waiting", "Sequences waiting in the engine.", labels=["replica"])
        usage = GaugeMetricFamily("pagewire_kv_cache_usage_ratio", "Fraction of KV blocks held by live requests.", labels=["replica"])
        for replica, load in self._loads.items():
            running.add_metric([replica], load.num_running)
            waiting.add_metric([replica], load.num_waiting)
            usage.add_metric([replica], load.kv_cache_usage)
        prefix_hit = GaugeMetricFamily(
            "pagewire_prefix_cache_hit_ratio", "Prompt tokens found in the prefix cache over those looked up, since engine start.", labels=["replica"]
        )
        for replica, ratio in self._prefix_hits.items():
            prefix_hit.add_metric([replica], ratio)
        yield from (running, waiting, usage, prefix_hit)


class SpecDecodeCounters(Collector):
    """Speculative decoding totals of each replica, as its last Stats report
    them: counters that the engine keeps, shown as they are."""

    def __init__(self) -> None:
        self._stats: dict[str, engine_pb2.EngineStats] = {}

    def observe(self, replica: str, stats: engine_pb2.EngineStats) -> None:
        self._stats[replica] = stats

    def forget_replica(self, replica: str) -> None:
        self._stats.pop(replica, None)

    def collect(self) -> Iterator[Metric]:
        drafts = CounterMetricFamily("pagewire_spec_decode_draft_tokens", "Speculative tokens proposed and verified.", labels=["replica"])
        accepted = CounterMetricFamily("pagewire_spec_decode_accepted_tokens", "Speculative tokens accepted (emitted as output).", labels=["replica"])
        by_position = CounterMetricFamily(
            "pagewire_spec_decode_accepted_tokens_by_position", "Accepted speculative tokens by position in the proposal (0 = first).", labels=["replica", "position"]
        )
        for replica, stats in self._stats.items():
            drafts.add_metric([replica], stats.spec_decode_draft_tokens_total)
            accepted.add_metric([replica], stats.spec_decode_accepted_tokens_total)
            for position, count in enumerate(stats.spec_decode_accepted_tokens_by_position):
                by_position.add_metric([replica, str(position)], count)
        yield from (drafts, accepted, by_position)


class GatewayMetrics:
    """One registry per gateway, so that several gateways (tests) can coexist.
    `whole_server`: this gateway is one of several workers whose request
    figures are summed at each scrape (PROMETHEUS_MULTIPROC_DIR)."""

    def __init__(self, whole_server: bool = False) -> None:
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
        self.replicas = ReplicaGauges()
        self.model_server = ModelServerProtocol()
        self.spec_decode = SpecDecodeCounters()
        # What a scrape shows: this registry, or every worker's request figures.
        self._scraped = r
        if whole_server:
            self._scraped = CollectorRegistry()
            MultiProcessCollector(self._scraped)
        for collector in (self.replicas, self.model_server, self.spec_decode):
            self._scraped.register(collector)

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
        self.replicas.observe_load(replica, load)
        self.model_server.observe_load(replica, load)

    def observe_stats(self, replica: str, stats: engine_pb2.EngineStats, info: engine_pb2.EngineInfo | None = None) -> None:
        """`info`: the replica's Info, which sizes its KV cache for the model-server figures."""
        self.observe_load(replica, stats.load)
        self.model_server.observe_stats(replica, stats)
        if info is not None:
            self.model_server.observe_info(replica, info)
        queried = stats.prefix_cache_queried_tokens
        self.replicas.observe_prefix_hit(replica, stats.prefix_cache_hit_tokens / queried if queried else 0.0)
        self.spec_decode.observe(replica, stats)

    def forget_replica(self, replica: str) -> None:
        """Drop the figures of a replica out of rotation until it reports again."""
        self.replicas.forget_replica(replica)
        self.model_server.forget_replica(replica)
        self.spec_decode.forget_replica(replica)

    def render(self) -> bytes:
        return generate_latest(self._scraped)
