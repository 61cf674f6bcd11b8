"""Choosing an engine replica for a request.

- least-loaded: the replica with the fewest requests, counting both what this
  gateway has in flight there and what the engine last reported running and
  waiting (other gateways may share it); KV cache use breaks ties.
- prefix-affinity: requests whose first prompt block(s) are equal go to the
  same replica, so its prefix cache serves them. Rendezvous hashing keeps
  the assignment of every other prefix when a replica leaves or returns.
  Prompts shorter than one block fall back to least-loaded.
"""

from __future__ import annotations

import enum
import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field


from pagewire.services.common.errors import Refusal, RequestError
from pagewire.v1 import engine_pb2


class RoutingPolicy(enum.StrEnum):
    LEAST_LOADED = "least-loaded"
    PREFIX_AFFINITY = "prefix-affinity"


@dataclass
class ReplicaState:
    """What the router knows of one engine replica."""

    address: str
    # Set once the replica answered Info; kept while it is away, so that its
    # model stays known.
    info: engine_pb2.EngineInfo | None = None
    available: bool = False
    load: engine_pb2.EngineLoad = field(default_factory=engine_pb2.EngineLoad)
    in_flight: set[str] = field(default_factory=set)

    @property
    def model_id(self) -> str | None:
        return self.info.model_id if self.info else None

    def load_key(self) -> tuple[int, float]:
        reported = self.load.num_running + self.load.num_waiting
        return max(len(self.in_flight), reported), self.load.kv_cache_usage


def prefix_key(prompt_ids: Sequence[int], block_size: int, blocks: int) -> bytes | None:
    """Digest of the first `blocks` full blocks of the prompt (fewer if the
    prompt is shorter); None when not even one block is full."""
    full = min(len(prompt_ids) // block_size, blocks)
    if full == 0:
        return None
    return hashlib.blake2b(array("I", prompt_ids[: full * block_size]).tobytes(), digest_size=16).digest()


def _rendezvous_score(key: bytes, address: str) -> bytes:
    return hashlib.blake2b(key + address.encode(), digest_size=8).digest()


class Router:
    def __init__(self, replicas: Sequence[ReplicaState], policy: RoutingPolicy, affinity_blocks: int):
        self.replicas = list(replicas)
        self.policy = policy
        self.affinity_blocks = affinity_blocks

    def served_models(self) -> list[engine_pb2.EngineInfo]:
        """The Info of one replica per model id, in replica order."""
        seen: dict[str, engine_pb2.EngineInfo] = {}
        for replica in self.replicas:
            if replica.info is not None:
                seen.setdefault(replica.info.model_id, replica.info)
        return list(seen.values())

    def resolve_model(self, model: str) -> engine_pb2.EngineInfo:
        """The served model `model` names; empty names the first one served.
        NOT_FOUND for a model no replica serves."""
        models = self.served_models()
        if not models:
            raise RequestError(Refusal.UNAVAILABLE, "no engine replica has connected yet; retry shortly")
        if not model:
            return models[0]
        for info in models:
            if info.model_id == model:
                return info
        served = ", ".join(repr(info.model_id) for info in models)
        raise RequestError(Refusal.NOT_FOUND, f"model {model!r} is not served here; available: {served}")

    def pick(self, model_id: str, prompt_ids: Sequence[int]) -> ReplicaState:
        candidates = [r for r in self.replicas if r.available and r.model_id == model_id]
        if not candidates:
            raise RequestError(Refusal.UNAVAILABLE, f"no engine replica serving {model_id!r} is available; retry shortly")
        if self.policy is RoutingPolicy.PREFIX_AFFINITY:
            key = prefix_key(prompt_ids, candidates[0].info.block_size, self.affinity_blocks)  # type: ignore[union-attr]
            if key is not None:
                return max(candidates, key=lambda r: _rendezvous_score(key, r.address))
        return min(candidates, key=ReplicaState.load_key)
