"""Choosing an engine replica for a request.

- least-loaded: the replica with the fewest requests, counting both what this
  gateway has in flight there and what the engine last reported running and
  waiting (other gateways may share it); KV cache use breaks ties.
- prefix-affinity: requests whose first prompt block(s) are equal go to the
  same replica, so its prefix cache serves them. Rendezvous hashing keeps
  the assignment of every other prefix when a replica leaves or returns.
  Prompts shorter than one block fall back to least-loaded.

Replicas may serve different models; a request goes to one of its model's
replicas, and a request for a LoRA adapter (named as the model, or in the
lora field beside its base model) to one of those that have it loaded.
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


@dataclass(frozen=True)
class Target:
    """What a request runs on: a served model's Info, and the LoRA adapter ("" for none)."""

    info: engine_pb2.EngineInfo
    lora: str = ""


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
        served = ", ".join(repr(name) for name in [info.model_id for info in models] + list(self.served_adapters()))
        raise RequestError(Refusal.NOT_FOUND, f"model {model!r} is not served here; available: {served}")

    def served_adapters(self) -> dict[str, str]:
        """Every LoRA adapter a replica has loaded -> the model id it adapts, in replica order
        (a name loaded on replicas of two models is the first one's)."""
        adapters: dict[str, str] = {}
        for replica in self.replicas:
            if replica.info is not None:
                for name in replica.info.lora_adapters:
                    adapters.setdefault(name, replica.info.model_id)
        return adapters

    def resolve(self, model: str, lora: str = "") -> Target:
        """The model and adapter a request names: `model` a served model (empty:
        the first) with `lora` one of its adapters, or `model` an adapter's name."""
        adapters = self.served_adapters()
        is_model = any(info.model_id == model for info in self.served_models())
        if model in adapters and not is_model:
            if lora:
                raise RequestError(Refusal.INVALID_ARGUMENT, f"model {model!r} is a LoRA adapter; name its base model {adapters[model]!r} beside lora", "lora")
            return Target(self.resolve_model(adapters[model]), model)
        info = self.resolve_model(model)
        if lora and adapters.get(lora) != info.model_id:
            loaded = ", ".join(repr(name) for name, base in adapters.items() if base == info.model_id) or "none"
            raise RequestError(Refusal.NOT_FOUND, f"LoRA adapter {lora!r} is not loaded on any replica of model {info.model_id!r} (loaded: {loaded})", "lora")
        return Target(info, lora)

    def pick(self, model_id: str, prompt_ids: Sequence[int], lora: str = "") -> ReplicaState:
        candidates = [r for r in self.replicas if r.available and r.model_id == model_id]
        if lora:
            candidates = [r for r in candidates if lora in r.info.lora_adapters]  # type: ignore[union-attr]
        if not candidates:
            served = f"{model_id!r} with LoRA adapter {lora!r}" if lora else repr(model_id)
            raise RequestError(Refusal.UNAVAILABLE, f"no engine replica serving {served} is available; retry shortly")
        if self.policy is RoutingPolicy.PREFIX_AFFINITY:
            key = prefix_key(prompt_ids, candidates[0].info.block_size, self.affinity_blocks)  # type: ignore[union-attr]
            if key is not None:
                return max(candidates, key=lambda r: _rendezvous_score(key, r.address))
        return min(candidates, key=ReplicaState.load_key)
