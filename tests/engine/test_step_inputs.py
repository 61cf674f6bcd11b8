"""The host side of a step's inputs: the KV cache slots of a chunk of
positions, and a sequence's known tokens by range, against the per-token
forms they replace (one position at a time)."""

from __future__ import annotations

import random

import pytest

from pagewire.services.engine.core.sequence import SamplingParams, Sequence
from pagewire.services.engine.executor.runner import PendingInputs, cache_slots


def per_token_slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_cache_slots_match_the_per_token_slots_at_every_boundary(block_size: int) -> None:
    rng = random.Random(block_size)
    block_table = rng.sample(range(10_000), 12)
    length = len(block_table) * block_size
    for start in range(length):
        for end in range(start + 1, length + 1):
            assert cache_slots(block_table, start, end, block_size) == per_token_slots(block_table, start, end, block_size), (start, end)


def _sequence(prompt_len: int, output_len: int) -> Sequence:
    seq = Sequence("r", list(range(100, 100 + prompt_len)), SamplingParams(temperature=0.0), 0.0)
    seq.output_token_ids = list(range(500, 500 + output_len))
    return seq


def test_token_slice_matches_token_at_across_prompt_and_output() -> None:
    seq = _sequence(5, 4)
    for start in range(seq.num_known_tokens + 1):
        for stop in range(start, seq.num_known_tokens + 1):
            assert seq.token_slice(start, stop) == [seq.token_at(p) for p in range(start, stop)], (start, stop)


def test_tokens_leave_a_recorded_placeholder_for_the_one_not_read_back() -> None:
    seq = _sequence(5, 2)
    seq.num_pending_tokens = 1  # sampled by the step before, still on the device
    pending = PendingInputs(None)
    assert pending.tokens(seq, 3, seq.num_tokens, flat_index=10) == [103, 104, 500, 501, 0]
    assert pending.positions == [14]
    assert pending.tokens(seq, 0, 2, flat_index=0) == [100, 101] and pending.positions == [14]
