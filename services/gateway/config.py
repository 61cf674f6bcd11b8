"""Gateway settings: plain data, so that the CLI and `pagewire serve` read
them without starting a gateway."""

from __future__ import annotations

from dataclasses import dataclass

from pagewire.services.common.config import ServiceConfig, default_workers, option
from pagewire.services.common.limits import DEFAULT_CLIENT_READ_TIMEOUT_S, DEFAULT_MAX_BUFFERED_OUTPUT_BYTES
from pagewire.services.gateway.router import RoutingPolicy


@dataclass
class GatewayConfig(ServiceConfig):
    """The pagewire gateway: public gRPC API and OpenAI-style REST shim."""

    port: int = option(50051, "gRPC port of the public API.")
    http_port: int = option(8000, "Port of the OpenAI-style REST API (same host as gRPC).")
    tokenizer: list[str] = option(
        ["127.0.0.1:50052"],
        "Addresses of the tokenizer workers (repeat the flag; environment: comma-separated): each gateway worker "
        "spreads its Tokenize requests over them, least loaded first, and keeps each request's detokenization on one.",
    )
    gateway_workers: int = option(
        default_workers(),
        "Gateway processes sharing the public gRPC and REST ports (SO_REUSEPORT), each with its own streams to the "
        "tokenizer and engines; default: one per four cores, 1 to 8.",
    )
    engine: list[str] = option(
        ["127.0.0.1:50053"],
        "Engine replicas: HOST:PORT, dns:///NAME:PORT (every address NAME resolves to) or file:///PATH (HOST:PORT lines); "
        "repeat the flag for several (environment: comma-separated).",
    )
    discovery_interval_s: float = option(5.0, "Seconds between re-resolutions of dns:/// and file:/// engine targets.")
    routing: str = option(RoutingPolicy.LEAST_LOADED.value, "How requests are spread over engine replicas.", choices=[p.value for p in RoutingPolicy])
    prefix_affinity_blocks: int = option(1, "Leading prompt blocks whose hash picks the replica under prefix-affinity routing.")
    max_concurrent_requests: int = option(4096, "Requests in flight beyond which new ones are refused (RESOURCE_EXHAUSTED / HTTP 429).")
    connect_timeout_s: float = option(5.0, "Seconds one connection attempt to a peer may take.")
    reconnect_initial_s: float = option(0.25, "First wait before reconnecting to a peer that went away; doubles per failed attempt.")
    reconnect_max_s: float = option(2.0, "Longest wait between reconnection attempts.")
    max_buffered_output_bytes: int = option(
        DEFAULT_MAX_BUFFERED_OUTPUT_BYTES,
        "Output of one request that its client has not read yet past which the request is aborted (RESOURCE_EXHAUSTED); "
        "at most half of --max-message-bytes is used.",
    )
    client_read_timeout_s: float = option(
        DEFAULT_CLIENT_READ_TIMEOUT_S,
        "Seconds a request's output may wait unread by its client before the request is aborted (DEADLINE_EXCEEDED) and its KV blocks freed.",
    )
    api_key: str = option(
        "",
        "Require 'Authorization: Bearer KEY' on both public ports (health, reflection and /metrics stay open); empty: no key.",
        secret=True,
    )
    tls_cert: str = option("", "PEM certificate chain for TLS on both public ports; with --tls-key.")
    tls_key: str = option("", "PEM private key for TLS on both public ports; with --tls-cert.")
