"""Replica choice: least-loaded, prefix-affinity, availability and models."""

from __future__ import annotations

import random

import pytest

from pagewire.services.common.errors import Refusal, RequestError
from pagewire.v1 import engine_pb2
from pagewire.services.gateway.router import ReplicaState, Router, RoutingPolicy, prefix_key

BLOCK = 16


def replica(address: str, model: str = "m", running: int = 0, waiting: int = 0, kv: float = 0.0, in_flight: int = 0) -> ReplicaState:
    state = ReplicaState(address, info=engine_pb2.EngineInfo(model_id=model, block_size=BLOCK, max_model_len=2048), available=True)
    state.load = engine_pb2.EngineLoad(num_running=running, num_waiting=waiting, kv_cache_usage=kv)
    state.in_flight = {f"{address}-{i}" for i in range(in_flight)}
    return state


def test_least_loaded_counts_reported_and_local_load() -> None:
    busy = replica("a:1", running=5, waiting=3)
    # Nothing reported yet, but this gateway just sent it six requests.
    fresh_sends = replica("b:1", in_flight=6)
    idle = replica("c:1", running=1, in_flight=1)
    router = Router([busy, fresh_sends, idle], RoutingPolicy.LEAST_LOADED, 1)
    assert router.pick("m", [1, 2, 3]) is idle
    idle.in_flight |= {f"x{i}" for i in range(10)}
    assert router.pick("m", [1, 2, 3]) is fresh_sends


def test_least_loaded_breaks_ties_by_kv_cache_use() -> None:
    full = replica("a:1", running=2, kv=0.9)
    roomy = replica("b:1", running=2, kv=0.2)
    assert Router([full, roomy], RoutingPolicy.LEAST_LOADED, 1).pick("m", [1]) is roomy


def test_unavailable_replicas_and_other_models_are_skipped() -> None:
    down = replica("a:1")
    down.available = False
    other_model = replica("b:1", model="other")
    busy = replica("c:1", running=50)
    router = Router([down, other_model, busy], RoutingPolicy.LEAST_LOADED, 1)
    assert router.pick("m", [1]) is busy
    busy.available = False
    with pytest.raises(RequestError) as raised:
        router.pick("m", [1])
    assert raised.value.kind == Refusal.UNAVAILABLE


def test_prefix_affinity_sends_a_shared_prefix_to_one_replica_whatever_the_load() -> None:
    replicas = [replica(f"10.0.0.{i}:50053") for i in range(4)]
    router = Router(replicas, RoutingPolicy.PREFIX_AFFINITY, 1)
    system_prompt = list(range(100, 100 + BLOCK))
    chosen = router.pick("m", system_prompt + [1, 2, 3])
    chosen.load = engine_pb2.EngineLoad(num_running=40)
    assert all(router.pick("m", system_prompt + tail) is chosen for tail in ([7], [8, 9], list(range(50))))


def test_prefix_affinity_spreads_distinct_prefixes_and_survives_a_replica_leaving() -> None:
    rng = random.Random(0)
    replicas = [replica(f"10.0.0.{i}:50053") for i in range(4)]
    router = Router(replicas, RoutingPolicy.PREFIX_AFFINITY, 1)
    prompts = [[rng.randrange(49152) for _ in range(BLOCK + 3)] for _ in range(400)]
    before = [router.pick("m", p) for p in prompts]
    counts = {r.address: sum(1 for c in before if c is r) for r in replicas}
    assert min(counts.values()) > 60, counts  # about 100 each

    leaving = replicas[2]
    leaving.available = False
    after = [router.pick("m", p) for p in prompts]
    # Rendezvous hashing: only the leaving replica's prefixes move.
    assert all(a is b for a, b in zip(before, after) if a is not leaving)
    assert all(a is not leaving for a in after)


def test_prefix_affinity_falls_back_to_least_loaded_below_one_block() -> None:
    busy, idle = replica("a:1", running=9), replica("b:1")
    router = Router([busy, idle], RoutingPolicy.PREFIX_AFFINITY, 1)
    assert router.pick("m", list(range(BLOCK - 1))) is idle


def test_prefix_key_covers_only_the_configured_blocks() -> None:
    prompt = list(range(3 * BLOCK + 5))
    assert prefix_key(prompt, BLOCK, 1) == prefix_key(prompt[:BLOCK] + [0] * 40, BLOCK, 1)
    assert prefix_key(prompt, BLOCK, 2) != prefix_key(prompt[:BLOCK] + [0] * 40, BLOCK, 2)
    assert prefix_key(prompt[: BLOCK - 1], BLOCK, 1) is None


def test_model_resolution() -> None:
    router = Router([], RoutingPolicy.LEAST_LOADED, 1)
    with pytest.raises(RequestError) as raised:
        router.resolve_model("")
    assert raised.value.kind == Refusal.UNAVAILABLE

    router.replicas = [replica("a:1", model="small"), replica("b:1", model="small"), replica("c:1", model="large")]
    assert [info.model_id for info in router.served_models()] == ["small", "large"]
    assert router.resolve_model("").model_id == "small"
    assert router.resolve_model("large").model_id == "large"
    with pytest.raises(RequestError) as raised:
        router.resolve_model("gpt-4")
    assert raised.value.kind == Refusal.NOT_FOUND
    assert "'gpt-4'" in raised.value.message and "'small'" in raised.value.message


def test_lora_adapters_resolve_to_their_base_model_and_route_to_replicas_that_have_them() -> None:
    with_adapter, without, other_model = replica("a:1", model="base"), replica("b:1", model="base"), replica("c:1", model="other")
    with_adapter.info.lora_adapters.append("sql")  # type: ignore[union-attr]
    router = Router([without, with_adapter, other_model], RoutingPolicy.LEAST_LOADED, 1)
    assert router.served_adapters() == {"sql": "base"}
    assert router.resolve("sql").info.model_id == "base" and router.resolve("sql").lora == "sql"
    assert router.resolve("base", "sql").lora == "sql" and router.resolve("base").lora == ""
    # The least loaded replica of the model lacks the adapter: its requests go to the one that has it.
    with_adapter.load = engine_pb2.EngineLoad(num_running=9)
    assert router.pick("base", [1], "sql") is with_adapter
    assert router.pick("base", [1]) is without
    for model, lora, kind in [("other", "sql", Refusal.NOT_FOUND), ("base", "nope", Refusal.NOT_FOUND), ("sql", "sql", Refusal.INVALID_ARGUMENT)]:
        with pytest.raises(RequestError) as raised:
            router.resolve(model, lora)
        assert raised.value.kind == kind and raised.value.field == "lora"
    with_adapter.available = False
    with pytest.raises(RequestError) as raised:
        router.pick("base", [1], "sql")
    assert raised.value.kind == Refusal.UNAVAILABLE and "'sql'" in raised.value.message
