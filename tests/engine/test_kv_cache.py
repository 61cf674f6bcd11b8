"""Block pool and prefix cache bookkeeping, without a model."""

from __future__ import annotations

import hashlib
from array import array

from pagewire.services.engine.core.kv_cache import SLID_OUT, KVCacheManager, hash_block
from pagewire.services.engine.core.sequence import SamplingParams, Sequence


def _seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, tokens, SamplingParams(), arrival_time=0.0)


def _prefill(kv: KVCacheManager, seq: Sequence) -> None:
    """Admit seq the way the scheduler does and mark its prompt computed."""
    hits = kv.cached_prefix(seq)
    assert kv.allocate_slots(seq, seq.num_tokens - len(hits) * kv.block_size, hits)
    seq.num_computed_tokens = seq.num_tokens
    kv.cache_computed_blocks(seq)


def test_full_blocks_are_shared_and_the_last_token_is_never_a_hit() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = _seq("a", list(range(12)))  # exactly three full blocks
    _prefill(kv, first)
    second = _seq("b", list(range(12)))
    hits = kv.cached_prefix(second)
    # The third block holds the last prompt token, whose logits must be computed.
    assert [b.block_id for b in hits] == first.block_table[:2]
    hashes_before = {b.block_id: b.block_hash for b in kv.pool.blocks}
    _prefill(kv, second)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert second.num_computed_tokens == 12
    # Adopting a hit never rewrites a hash, and the duplicate third block stays private.
    assert {b.block_id: b.block_hash for b in kv.pool.blocks} == hashes_before
    assert kv.pool.blocks[first.block_table[0]].ref_count == 2
    assert kv.queried_tokens == 24 and kv.hit_tokens == 8


def test_different_prefix_misses_even_with_equal_later_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    _prefill(kv, _seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block, different first block: the chained hash must differ.
    assert kv.cached_prefix(_seq("b", [9, 9, 9, 9, 5, 6, 7, 8, 9])) == []


def test_freed_cached_blocks_are_reused_lru_after_uncached_ones() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    cached = _seq("a", [1, 2, 3, 4, 5])  # blocks: [1 2] [3 4] [5]
    _prefill(kv, cached)
    table = list(cached.block_table)
    kv.free(cached)
    assert kv.pool.num_free == 6 and kv.pool.num_cached_free == 2
    # The partial third block holds nothing reusable and goes first; the two
    # cached blocks go last, the tail block before the prefix block.
    order = list(kv.pool.free_queue)
    assert order[0] == table[2]
    assert order[-2:] == [table[1], table[0]]
    # Revived blocks leave the free queue; the rest of the pool stays allocatable.
    again = _seq("b", [1, 2, 3, 4, 7])
    _prefill(kv, again)
    assert again.block_table[:2] == table[:2]
    assert kv.pool.num_free == 3 and kv.pool.num_cached_free == 0
    big = _seq("c", list(range(100, 106)))
    assert kv.allocate_slots(big, 6)
    assert kv.pool.num_free == 0
    kv.free(big)
    kv.free(again)
    assert all(b.ref_count == 0 for b in kv.pool.blocks) and kv.pool.num_free == 6


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=True)
    seq = _seq("a", list(range(20)))
    assert not kv.allocate_slots(seq, 20)
    assert seq.block_table == [] and kv.pool.num_free == 3 and kv.queried_tokens == 0


def test_evicting_a_cached_block_drops_its_hash() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=2, enable_prefix_caching=True)
    first = _seq("a", [1, 2, 3])
    _prefill(kv, first)
    kv.free(first)
    assert len(kv.pool.cached) == 1
    other = _seq("b", [7, 8, 9, 10])
    assert kv.allocate_slots(other, 4)
    assert kv.pool.cached == {} and kv.pool.num_cached_free == 0
    assert kv.cached_prefix(_seq("c", [1, 2, 3])) == []


def test_blocks_filled_by_later_steps_enter_the_prefix_cache() -> None:
    # A block left partial by one step (a prompt chunk ending mid-block, or the
    # last prompt block) and filled by later steps (the next chunk, decoded
    # tokens) is cached once full: a follow-up turn that repeats the output hits it.
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    seq = _seq("a", list(range(10)))
    assert kv.allocate_slots(seq, 6)  # first chunk ends inside block 1
    seq.num_computed_tokens = 6
    kv.cache_computed_blocks(seq)
    assert kv.allocate_slots(seq, 4)  # the rest of the prompt
    seq.num_computed_tokens = 10
    kv.cache_computed_blocks(seq)
    for token in (10, 11, 12, 13):  # decode four tokens, one a step
        seq.append_output(token)
        assert kv.allocate_slots(seq, 1)
        seq.num_computed_tokens += 1
        kv.cache_computed_blocks(seq)
    follow_up = _seq("b", list(range(14)) + [99, 98])
    assert [b.block_id for b in kv.cached_prefix(follow_up)] == seq.block_table[:3]


def test_block_hash_is_a_sha256_chained_over_the_prefix() -> None:
    first = hash_block(None, [1, 2, 3, 4])
    assert first == hashlib.sha256(array("I", [1, 2, 3, 4]).tobytes()).digest()
    # The same tokens after another prefix are another block.
    assert hash_block(first, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(first, [5, 6, 7, 8]) == hashlib.sha256(first + array("I", [5, 6, 7, 8]).tobytes()).digest()


def test_blocks_before_the_window_go_back_to_the_pool_keeping_their_hashes() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True, sliding_window=6)
    seq = _seq("a", list(range(21)))
    _prefill(kv, seq)
    seq.num_computed_tokens = 20  # the next query sits at position 20 and sees 15..20
    kv.release_slid_blocks(seq)
    assert seq.block_table[:3] == [SLID_OUT] * 3 and SLID_OUT not in seq.block_table[3:]
    assert kv.pool.num_free == 8 - 3 and kv.pool.num_cached_free == 3
    kv.release_slid_blocks(seq)  # nothing more has slid
    assert kv.pool.num_free == 5
    # The same prompt hits all five full blocks but adopts only the two inside its window.
    other = _seq("b", list(range(21)))
    hits = kv.cached_prefix(other)
    assert len(hits) == 5 and kv.allocate_slots(other, 1, hits)
    assert other.block_table[:3] == [SLID_OUT] * 3 and other.block_table[3:5] == seq.block_table[3:5]
    kv.free(seq)
    kv.free(other)
    assert kv.pool.num_free == 8 and all(b.ref_count == 0 for b in kv.pool.blocks)
    assert kv.most_blocks_held(1000, max_chunk=4) == 6 and KVCacheManager(8, 4, True).most_blocks_held(1000, 4) == 250
