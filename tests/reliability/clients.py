"""Clients of the public REST API for the reliability tests, and the way
every request's outcome is counted: completed, refused (429), unavailable
(503 / an UNAVAILABLE error event), or lost (anything else: a hang, a 5xx, a
broken stream)."""

from __future__ import annotations

import asyncio
import enum
import json
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagewire.v1 import gateway_pb2, gateway_pb2_grpc


class Outcome(enum.Enum):
    COMPLETED = "completed"
    REFUSED = "refused"
    UNAVAILABLE = "unavailable"
    DROPPED = "dropped"  # the client went away on purpose
    LOST = "lost"


@dataclass
class StreamResult:
    outcome: Outcome
    http_status: int | None
    events: int = 0
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    elapsed_s: float = 0.0
    detail: str = ""


def completion_body(max_tokens: int, prompt: str = "The capital of France is", **extra: Any) -> dict[str, Any]:
    """A streamed /v1/completions body; ignore_eos makes every request run to max_tokens."""
    return {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0, "ignore_eos": True, **extra}


async def stream_completion(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    timeout_s: float,
    first_event: asyncio.Event | None = None,
    drop_after_events: int | None = None,
) -> StreamResult:
    """POST a streaming completion and read it to the end (or drop it after
    `drop_after_events` events). Never raises: a failure is an outcome.
    `first_event` is set once the first event has arrived."""
    started = time.monotonic()
    result = StreamResult(Outcome.LOST, None)
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", "/v1/completions", json=body) as response:
                result.http_status = response.status_code
                if response.status_code != 200:
                    await response.aread()
                    result.error = _error_of(response)
                    result.outcome = {429: Outcome.REFUSED, 503: Outcome.UNAVAILABLE}.get(response.status_code, Outcome.LOST)
                    result.detail = response.text[:300]
                    return result
                done = False
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    result.events += 1
                    if first_event is not None:
                        first_event.set()
                    if "error" in event:
                        result.error = event["error"]
                    elif event.get("choices") and event["choices"][0].get("finish_reason"):
                        result.finish_reason = event["choices"][0]["finish_reason"]
                    if drop_after_events is not None and result.events >= drop_after_events:
                        result.outcome = Outcome.DROPPED
                        return result
                if result.error is not None:
                    unavailable = result.error.get("code") == "UNAVAILABLE"
                    result.outcome = Outcome.UNAVAILABLE if unavailable else Outcome.LOST
                    result.detail = json.dumps(result.error)[:300]
                elif done and result.finish_reason is not None:
                    result.outcome = Outcome.COMPLETED
                else:
                    result.detail = f"stream ended without a finish reason (done marker: {done})"
    except TimeoutError:
        result.detail = f"no end after {timeout_s} s"
    except httpx.HTTPError as exc:
        result.detail = f"{type(exc).__name__}: {exc}"
    finally:
        result.elapsed_s = time.monotonic() - started
    return result


def _error_of(response: httpx.Response) -> dict[str, Any] | None:
    try:
        return response.json().get("error")
    except (json.JSONDecodeError, AttributeError):
        return None


def tally(results: list[StreamResult]) -> dict[str, int]:
    counts = Counter(result.outcome.value for result in results)
    return {"sent": len(results), **{outcome.value: counts.get(outcome.value, 0) for outcome in Outcome}}


@dataclass
class HealthWatch:
    """Polls the gateway's REST /health and gRPC health while a test runs, to
    show the server kept answering."""

    rest_client: httpx.AsyncClient
    grpc_target: str
    interval_s: float = 0.5
    answer_within_s: float = 5.0
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    slowest_s: float = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(self.grpc_target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    async with asyncio.timeout(self.answer_within_s):
                        rest = await self.rest_client.get("/health")
                        grpc_reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
                    if rest.status_code != 200 or grpc_reply.status != health_pb2.HealthCheckResponse.SERVING:
                        self.failures.append(f"REST {rest.status_code}, gRPC {grpc_reply.status}")
                    else:
                        self.answered += 1
                except (TimeoutError, httpx.HTTPError, grpc.aio.AioRpcError) as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                try:
                    await asyncio.wait_for(stop.wait(), self.interval_s)
                except TimeoutError:
                    pass


def rest_client(base_url: str, headers: dict[str, str] | None = None, verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """A client with no pool limit, so every request of a test is in flight
    at once; `verify`: the TLS context that trusts an https server."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(60.0), headers=headers, verify=verify)


async def metric_values(client: httpx.AsyncClient, name: str) -> list[float]:
    """Every sample of the Prometheus metric `name` on the gateway's /metrics."""
    text = (await client.get("/metrics")).text
    values = []
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            values.append(float(line.rsplit(" ", 1)[1]))
    return values



# The storm's prompt, and max_tokens long enough that every stream is still
# going when its client drops it.
STORM_BODY = completion_body(max_tokens=400, prompt="Tell me a long story about a lighthouse keeper.")


async def drop_streams(client: httpx.AsyncClient, clients: int, settle_timeout_s: float) -> tuple[list[StreamResult], list[float], list[float], float]:
    """`clients` streaming completions at once, each dropped after its second
    event; then /metrics polled until no request runs and no KV block is
    held, or settle_timeout_s passes. Returns the streams' results, the last
    pagewire_requests_running and pagewire_kv_cache_usage_ratio samples, and
    the seconds it took to settle."""
    results = await asyncio.gather(*(stream_completion(client, STORM_BODY, timeout_s=120.0, drop_after_events=2) for _ in range(clients)))
    dropped_at = time.monotonic()
    running: list[float] = []
    kv_usage: list[float] = []
    while time.monotonic() - dropped_at < settle_timeout_s:
        running = await metric_values(client, "pagewire_requests_running")
        kv_usage = await metric_values(client, "pagewire_kv_cache_usage_ratio")
        if running and kv_usage and not any(running) and not any(kv_usage):
            break
        await asyncio.sleep(0.25)
    return list(results), running, kv_usage, time.monotonic() - dropped_at

@dataclass
class GrpcResult:
    code: grpc.StatusCode
    chunks: int
    finish_reason: int
    details: str
    elapsed_s: float


async def grpc_complete(
    target: str, request: gateway_pb2.GenerateRequest, timeout_s: float, first_chunk: asyncio.Event | None = None, metadata: tuple[tuple[str, str], ...] = ()
) -> GrpcResult:
    """Call Generation.Complete and read every chunk; the RPC's status, never raises."""
    started = time.monotonic()
    chunks = 0
    finish_reason = 0
    async with grpc.aio.insecure_channel(target) as channel:
        call = gateway_pb2_grpc.GenerationStub(channel).Complete(request, timeout=timeout_s, metadata=metadata)
        try:
            async for chunk in call:
                chunks += 1
                finish_reason = chunk.finish_reason or finish_reason
                if first_chunk is not None:
                    first_chunk.set()
            code, details = grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
    return GrpcResult(code, chunks, finish_reason, details, time.monotonic() - started)
