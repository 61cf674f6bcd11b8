"""Helpers shared by the engine tests."""

from __future__ import annotations

from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.executor.model_executor import create_engine_core
from pagewire.services.engine.executor.loader import LoadedModel
from pagewire.services.engine.core.scheduler import ScheduledSequence
from pagewire.services.engine.core.sequence import RequestOutput, SamplingParams

# Output tokens per request in the engine tests, and in HF's greedy reference.
MAX_NEW_TOKENS = 12


# Whether make_engine overlaps steps; the `both_schedulings` fixture runs a
# test once with each value.
ASYNC_SCHEDULING = True


def make_engine(loaded: LoadedModel, **overrides) -> EngineCore:
    settings = {"num_kv_blocks": 128, "max_model_len": 1024, "async_scheduling": ASYNC_SCHEDULING} | overrides
    return create_engine_core(EngineConfig(**settings), loaded)


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
    assert not core.executor.sampler.request_generators


def mixed_sampling(max_tokens: int) -> list[SamplingParams]:
    """Seeded sampling with every filter, penalties and logprobs: requests
    whose outputs must not depend on how the engine steps."""
    return [
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=max_tokens),
        SamplingParams(temperature=1.2, top_k=20, min_p=0.05, seed=12, max_tokens=max_tokens),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4, max_tokens=max_tokens),
        SamplingParams(temperature=0.0, logprobs=3, max_tokens=max_tokens),
        SamplingParams(temperature=0.7, seed=13, presence_penalty=0.5, logprobs=2, max_tokens=max_tokens),
    ]


def per_token_inputs(scheduled: list[ScheduledSequence], block_size: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """A step's input ids (0 where the token is not read back yet), the rows
    of those placeholders, and each row's position and KV cache slot, worked
    out one position at a time: the reference for the runners' staging."""
    ids, placeholders, positions, slots = [], [], [], []
    for item in scheduled:
        seq, start = item.seq, item.seq.num_computed_tokens
        for position in range(start, start + item.num_new_tokens - len(seq.spec_token_ids)):
            if position < seq.num_known_tokens:
                ids.append(seq.token_at(position))
            else:
                placeholders.append(len(ids))
                ids.append(0)
        ids.extend(seq.spec_token_ids)
        for position in range(start, start + item.num_new_tokens):
            positions.append(position)
            slots.append(seq.block_table[position // block_size] * block_size + position % block_size)
    return ids, placeholders, positions, slots
