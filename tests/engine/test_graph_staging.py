"""The CUDA graph runner's host staging (GraphStaging), on the CPU, against
a per-token reference of what the graph must read: each sequence's rows
(its last token, or a placeholder for one not read back, then its
proposals), their positions and cache slots, its context length, its block
table, and padding rows and sequences that touch nothing."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pagewire.services.engine.core.kv_cache import KVCacheManager
from pagewire.services.engine.core.scheduler import ScheduledSequence
from pagewire.services.engine.core.sequence import SamplingParams, Sequence
from pagewire.services.engine.executor.cuda_graphs import MAX_PREFILL_GRAPHS, PREFILL_GRAPH_TOKEN_STEP, GraphStaging, prefill_graph_tokens
from pagewire.services.engine.executor.runner import PendingInputs
from tests.engine.util import per_token_inputs

BLOCK_SIZE = 4
MAX_BLOCKS = 16


def _sequence(rng: random.Random, index: int, max_drafts: int) -> Sequence:
    prompt_len, output_len = rng.randint(1, 20), rng.randint(0, 12)
    prompt = [rng.randrange(1000) for _ in range(prompt_len)]
    seq = Sequence(f"r{index}", prompt, SamplingParams(temperature=0.0), 0.0, output_token_ids=[rng.randrange(1000) for _ in range(output_len)])
    # Its newest token is either read back or still on the device.
    seq.num_pending_tokens = rng.randint(0, 1)
    seq.num_computed_tokens = seq.num_tokens - 1
    seq.spec_token_ids = [rng.randrange(1000) for _ in range(rng.randint(0, max_drafts))]
    blocks = -(-(seq.num_tokens + len(seq.spec_token_ids)) // BLOCK_SIZE)
    seq.block_table = rng.sample(range(10_000), blocks)
    return seq


def _check(staging: GraphStaging, sequences: list[Sequence], size: int, tokens_per_seq: int, lora: list[int] | None) -> None:
    pending = PendingInputs(None)
    num_tokens = staging.stage(sequences, pending, size, tokens_per_seq, lora)
    ids, unknown, positions, slots = per_token_inputs([ScheduledSequence(seq, 1 + len(seq.spec_token_ids)) for seq in sequences], BLOCK_SIZE)
    rows = staging.rows.numpy()
    num_rows = size * tokens_per_seq
    assert num_tokens == len(ids)
    assert rows[0, :num_tokens].tolist() == ids
    assert rows[1, :num_tokens].tolist() == positions
    assert rows[2, :num_tokens].tolist() == slots
    assert (rows[2, num_tokens:num_rows] == -1).all()  # padding rows write no cache slot
    assert pending.positions == unknown
    assert pending._sequences == [sequences[i] for i in range(len(sequences)) if sequences[i].num_computed_tokens >= sequences[i].num_known_tokens]
    ends = [seq.num_computed_tokens + 1 + len(seq.spec_token_ids) for seq in sequences]
    assert staging.seq_lens.numpy()[:size].tolist() == ends + [0] * (size - len(sequences))
    for row, seq in enumerate(sequences):
        assert staging.tables.numpy()[row, : len(seq.block_table)].tolist() == seq.block_table
    if lora is not None:
        assert rows[3, :num_tokens].tolist() == [slot for slot, seq in zip(lora, sequences) for _ in range(1 + len(seq.spec_token_ids))]
        assert (rows[3, num_tokens:num_rows] == -1).all()
    if tokens_per_seq > 1:
        starts = np.cumsum([0] + [1 + len(seq.spec_token_ids) for seq in sequences]).tolist()
        assert staging.query_start_loc.numpy()[: size + 1].tolist() == starts + [num_tokens] * (size - len(sequences))


@pytest.mark.parametrize("tokens_per_seq", [1, 4])
@pytest.mark.parametrize("with_lora", [False, True])
def test_staged_rows_match_the_per_token_reference(tokens_per_seq: int, with_lora: bool) -> None:
    rng = random.Random(tokens_per_seq * 10 + with_lora)
    staging = GraphStaging(rows=32 * tokens_per_seq, seqs=32, max_blocks=MAX_BLOCKS, block_size=BLOCK_SIZE, pin_memory=False)
    for num_seqs in (1, 3, 16, 29):
        sequences = [_sequence(rng, i, tokens_per_seq - 1) for i in range(num_seqs)]
        size = 32 if num_seqs > 16 else 16 if num_seqs > 1 else 1
        _check(staging, sequences, size, tokens_per_seq, [rng.randint(-1, 3) for _ in sequences] if with_lora else None)


def _allocated(kv: KVCacheManager, seq: Sequence, num_tokens: int) -> None:
    """Blocks for seq's first num_tokens positions, as the scheduler takes them."""
    computed, seq.num_computed_tokens = seq.num_computed_tokens, 0
    assert kv.allocate_slots(seq, num_tokens)
    seq.num_computed_tokens = computed


def test_a_staged_table_is_rewritten_when_it_grew_was_cut_or_belongs_to_another_sequence() -> None:
    rng = random.Random(7)
    staging = GraphStaging(rows=8, seqs=8, max_blocks=MAX_BLOCKS, block_size=BLOCK_SIZE, pin_memory=False)
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    sequences = [_sequence(rng, i, 0) for i in range(4)]
    # Two full blocks and a third opened for a proposal at position 8.
    rejected = Sequence("rejected", list(range(8)), SamplingParams(temperature=0.0), 0.0)
    rejected.num_computed_tokens = 7
    for seq in (sequences[1], rejected):
        seq.block_table = []
        _allocated(kv, seq, seq.num_tokens + 1)
    sequences.append(rejected)
    _check(staging, sequences, 8, 1, None)
    sequences[0].block_table.append(rng.randrange(10_000))  # grew
    kv.free(sequences[1])  # preempted and recomputed: a new table of the same length
    _allocated(kv, sequences[1], sequences[1].num_tokens + 1)
    sequences[2] = _sequence(rng, 9, 0)  # another sequence in its row
    # The proposal was rejected: its block goes back, another sequence takes
    # it, and the next step's proposal opens another block at the same index.
    proposal_block = rejected.block_table[2]
    kv.trim(rejected)
    other = Sequence("other", [1], SamplingParams(temperature=0.0), 0.0)
    _allocated(kv, other, 1)
    assert other.block_table == [proposal_block]
    _allocated(kv, rejected, 9)
    assert len(rejected.block_table) == 3 and rejected.block_table[2] != proposal_block
    for seq in sequences:
        seq.num_computed_tokens = seq.num_known_tokens - 1  # every token read back this time
        seq.num_pending_tokens = 0
    _check(staging, sequences, 8, 1, None)


@pytest.mark.parametrize("budget", [64, 256, 300, 4096, 8192, 8200, 65536, 100000])
def test_forward_graph_token_counts_cover_every_step_up_to_the_budget(budget: int) -> None:
    ladder = prefill_graph_tokens(budget)
    assert ladder[-1] == budget and ladder == sorted(set(ladder)) and len(ladder) <= MAX_PREFILL_GRAPHS
    steps = {later - earlier for earlier, later in zip([0, *ladder], ladder[:-1])}
    assert len(steps) <= 1 and all(step >= PREFILL_GRAPH_TOKEN_STEP and step % PREFILL_GRAPH_TOKEN_STEP == 0 for step in steps)
    # A step of n tokens pads to the first count >= n, by less than one step of the ladder.
    for num_tokens in (1, budget // 3 + 1, budget):
        padded = next(tokens for tokens in ladder if tokens >= num_tokens)
        assert padded - num_tokens < max(steps, default=budget)
