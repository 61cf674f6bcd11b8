"""The host side of a step's inputs: the layout of a flattened batch, the
KV cache slots of its positions, a sequence's known tokens by range, and
the eager runner's whole step inputs, against per-token references (one
position at a time)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pagewire.services.engine.core.scheduler import ScheduledSequence
from pagewire.services.engine.core.sequence import SamplingParams, Sequence
from pagewire.services.engine.executor.runner import ModelRunner, PendingInputs, cache_slots, token_layout
from tests.engine.util import per_token_inputs


def per_token_slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_cache_slots_match_the_per_token_slots_at_every_boundary(block_size: int) -> None:
    rng = random.Random(block_size)
    tables = np.array([rng.sample(range(10_000), 12) for _ in range(3)], dtype=np.int32)
    length = tables.shape[1] * block_size
    for start in range(length):
        for end in range(start + 1, length + 1):
            # Three sequences, each feeding [start, end) of its own table.
            first_rows, seq_of_row, positions = token_layout(np.array([start] * 3), np.array([end - start] * 3))
            assert first_rows.tolist() == [0, end - start, 2 * (end - start)]
            assert positions.tolist() == list(range(start, end)) * 3
            expected = [slot for table in tables.tolist() for slot in per_token_slots(table, start, end, block_size)]
            assert cache_slots(tables, seq_of_row, positions, block_size).tolist() == expected, (start, end)


def _sequence(prompt_len: int, output_len: int, prompt: list[int] | None = None) -> Sequence:
    prompt = list(range(100, 100 + prompt_len)) if prompt is None else prompt
    return Sequence("r", prompt, SamplingParams(temperature=0.0), 0.0, output_token_ids=list(range(500, 500 + output_len)))


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


def test_the_eager_runner_prepares_a_mixed_step_as_the_per_token_reference() -> None:
    """Prefill chunks (from the start and after cached blocks), decodes with
    the newest token read back or not, and a verify row of proposals, in one step."""
    block_size, rng = 4, random.Random(3)
    runner = ModelRunner(SimpleNamespace(model=None, device=torch.device("cpu")), [], block_size, sampler=None)  # type: ignore[arg-type]
    scheduled = []
    for prompt_len, output_len, pending, computed, new, drafts in [
        (13, 0, 0, 0, 13, 0),  # a whole prompt
        (30, 0, 0, 8, 9, 0),  # a middle chunk, after cached blocks
        (9, 5, 1, 13, 1, 0),  # a decode whose newest token is on the device
        (9, 5, 0, 13, 1, 0),  # a decode whose newest token was read back
        (6, 3, 0, 8, 3, 2),  # a verify step: the last token and two proposals
    ]:
        seq = _sequence(prompt_len, output_len, [rng.randrange(1000) for _ in range(prompt_len)])
        seq.num_pending_tokens, seq.num_computed_tokens = pending, computed
        seq.spec_token_ids = [rng.randrange(1000) for _ in range(drafts)]
        seq.block_table = rng.sample(range(1000), -(-(computed + new) // block_size))
        scheduled.append(ScheduledSequence(seq, new))
    pending = PendingInputs(None)
    batch = runner.prepare(scheduled, pending)
    ids, placeholders, positions, slots = per_token_inputs(scheduled, block_size)
    ends, starts, logits_rows = [], [0], []
    for item in scheduled:
        ends.append(item.seq.num_computed_tokens + item.num_new_tokens)
        starts.append(starts[-1] + item.num_new_tokens)
        if item.completes_sequence:
            logits_rows.extend(range(starts[-1] - 1 - len(item.seq.spec_token_ids), starts[-1]))
    assert batch.input_ids.tolist() == ids and pending.positions == placeholders
    assert batch.positions.tolist() == positions
    assert batch.metadata.slot_mapping.tolist() == slots
    assert batch.metadata.seq_lens.tolist() == ends and batch.metadata.seq_lens.dtype == torch.int32
    assert batch.metadata.query_start_loc.tolist() == starts and batch.metadata.query_start_loc.dtype == torch.int32
    assert batch.metadata.max_query_len == 13 and batch.metadata.max_seq_len == max(ends)
    for row, item in enumerate(scheduled):
        assert batch.metadata.block_tables[row, : len(item.seq.block_table)].tolist() == item.seq.block_table
    assert batch.logits_indices.tolist() == logits_rows
    assert batch.sampled_sequences == [item.seq for item in scheduled if item.completes_sequence]
