"""Disconnect storm: clients that drop their streams midway must leave
nothing behind: afterwards the gateway's /metrics shows no running sequence
and no KV block held, and the server still serves."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.reliability.clients import Outcome, completion_body, drop_streams, metric_values, rest_client, stream_completion, tally
from tests.reliability.settings import MAX_NUM_SEQS, MAX_QUEUE_LEN
from tests.support.harness import Cluster

SETTLE_TIMEOUT_S = 30.0


async def _storm(cluster: Cluster, clients: int) -> dict[str, Any]:
    async with rest_client(cluster.rest_url) as client:
        results, running, kv_usage, settled_s = await drop_streams(client, clients, SETTLE_TIMEOUT_S)
        after = await stream_completion(client, completion_body(max_tokens=4), timeout_s=60.0)
        cancelled = await metric_values(client, 'pagewire_requests_total{outcome="cancelled"}')
    counts = tally(list(results))
    # Refused ones (429) never started; the rest were dropped mid-stream.
    assert counts["dropped"] + counts["refused"] == clients, [r for r in results if r.outcome not in (Outcome.DROPPED, Outcome.REFUSED)][:3]
    if clients <= MAX_NUM_SEQS + MAX_QUEUE_LEN:
        assert counts["dropped"] == clients
    assert counts["dropped"] > 0
    assert running == [0.0], f"pagewire_requests_running is {running} {settled_s:.0f} s after the storm"
    assert kv_usage == [0.0], f"pagewire_kv_cache_usage_ratio is {kv_usage} {settled_s:.0f} s after the storm"
    assert after.outcome is Outcome.COMPLETED, after
    return {
        "clients": clients,
        "dropped_midway": counts["dropped"],
        "refused": counts["refused"],
        "lost": counts["lost"] + counts["unavailable"],
        "cancelled_requests_counted": cancelled[0] if cancelled else 0,
        "seconds_until_idle": round(settled_s, 2),
        "requests_running_after": running[0],
        "kv_cache_usage_after": kv_usage[0],
    }


def test_100_dropped_streams_free_every_sequence_and_block(serving_cluster: Cluster, record_figures) -> None:  # type: ignore[no-untyped-def]
    record_figures(asyncio.run(_storm(serving_cluster, clients=100)))


@pytest.mark.slow
def test_400_dropped_streams_free_every_sequence_and_block(serving_cluster: Cluster, record_figures) -> None:  # type: ignore[no-untyped-def]
    record_figures(asyncio.run(_storm(serving_cluster, clients=400)))
