"""Load: a burst of concurrent streaming requests far beyond what the engine
admits. Every request must complete or be refused with 429 at once (the
engine's bounded waiting queue), none may hang or fail otherwise, and the
gateway must answer health checks all the while."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.reliability.clients import HealthWatch, Outcome, StreamResult, completion_body, rest_client, stream_completion, tally
from tests.support.harness import Cluster

# A request still running past this is counted as hung.
REQUEST_TIMEOUT_S = 120.0


async def _burst(cluster: Cluster, concurrency: int, waves: int, max_tokens: int) -> tuple[list[StreamResult], HealthWatch, float]:
    async with rest_client(cluster.rest_url) as client:
        watch = HealthWatch(client, cluster.gateway.address)
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch.run(stop))
        started = time.monotonic()
        results: list[StreamResult] = []
        for wave in range(waves):
            bodies = [completion_body(max_tokens, prompt=f"Request {wave}-{i}: list some colours:") for i in range(concurrency)]
            results += await asyncio.gather(*(stream_completion(client, body, REQUEST_TIMEOUT_S) for body in bodies))
        elapsed = time.monotonic() - started
        stop.set()
        await watcher
    return results, watch, elapsed


def _check_and_summarise(results: list[StreamResult], watch: HealthWatch, elapsed: float) -> dict[str, Any]:
    counts = tally(results)
    lost = [r for r in results if r.outcome not in (Outcome.COMPLETED, Outcome.REFUSED)]
    assert not lost, f"{len(lost)} requests neither completed nor were refused, e.g. {lost[:3]}"
    assert counts["completed"] > 0
    refused = [r for r in results if r.outcome is Outcome.REFUSED]
    # A refusal is immediate and says why, in the OpenAI error body.
    for result in refused:
        assert result.error is not None and set(result.error) == {"message", "type", "param", "code"}, result
        assert (result.error["type"], result.error["code"], result.error["param"]) == ("rate_limit_error", "RESOURCE_EXHAUSTED", None), result
        assert isinstance(result.error["message"], str) and result.error["message"].strip(), result
    slowest_refusal = max((r.elapsed_s for r in refused), default=0.0)
    assert not watch.failures, f"health went unanswered during the load: {watch.failures[:5]}"
    assert watch.answered > 0
    return {
        **counts,
        "lost": counts["lost"] + counts["unavailable"],
        "wall_s": round(elapsed, 1),
        "slowest_completion_s": round(max((r.elapsed_s for r in results if r.outcome is Outcome.COMPLETED), default=0.0), 2),
        "slowest_refusal_s": round(slowest_refusal, 2),
        "health_checks_answered": watch.answered,
        "slowest_health_check_s": round(watch.slowest_s, 2),
    }


def test_200_concurrent_streams_complete_or_are_refused(serving_cluster: Cluster, record_figures) -> None:  # type: ignore[no-untyped-def]
    results, watch, elapsed = asyncio.run(_burst(serving_cluster, concurrency=200, waves=1, max_tokens=4))
    figures = _check_and_summarise(results, watch, elapsed)
    # With 200 at once and room for 32 running + 96 waiting, the bound must bite.
    assert figures["refused"] > 0
    record_figures(figures)


@pytest.mark.slow
def test_sustained_load_of_five_waves_of_400_streams(serving_cluster: Cluster, record_figures) -> None:  # type: ignore[no-untyped-def]
    results, watch, elapsed = asyncio.run(_burst(serving_cluster, concurrency=400, waves=5, max_tokens=16))
    record_figures(_check_and_summarise(results, watch, elapsed))
