"""Helpers shared by the engine tests."""

from __future__ import annotations

from services.engine.config import EngineConfig
from services.engine.engine import EngineCore
from services.engine.loader import LoadedModel
from services.engine.sequence import RequestOutput, SamplingParams


def make_engine(loaded: LoadedModel, **overrides) -> EngineCore:
    settings = {"num_kv_blocks": 128, "max_model_len": 1024} | overrides
    return EngineCore(EngineConfig(**settings), loaded)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def run_all(core: EngineCore, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    """Step until nothing is left; every output, grouped by request id."""
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not core.has_unfinished():
            return outputs
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError(f"engine still busy after {max_steps} steps")


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def assert_no_leaks(core: EngineCore) -> None:
    """The checks vLLM runs after every scheduler test."""
    pool = core.kv_cache.pool
    assert not core.scheduler.waiting and not core.scheduler.running
    assert not core.sequences
    assert all(block.ref_count == 0 for block in pool.blocks)
    assert pool.num_free == core.kv_cache.num_blocks
    assert core.kv_cache.usage == 0.0
    assert not core.sampler.request_generators
