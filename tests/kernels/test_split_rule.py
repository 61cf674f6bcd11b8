"""The context-split rule, the pipeline sizes and the block-size check of the GPU attention
(kernels/cuda_ops.py), which are plain arithmetic and run on the CPU, at an
H200's figures: 132 multiprocessors, and for head_dim 128 decodes 396
resident blocks (three per multiprocessor)."""

from __future__ import annotations

import pytest
import torch

from pagewire.kernels.cuda_ops import (
    KV_TILE,
    MAX_SPLITS,
    MIN_SPLIT_TOKENS,
    NARROW_ROW_DECODE_STAGES,
    PIPELINE_STAGES,
    attention_shared_bytes,
    choose_blocks_per_multiprocessor,
    choose_num_splits,
    choose_tile_rows,
    paged_attention,
    pipeline_stages,
)

MULTIPROCESSORS = 132
RESIDENT = 3 * MULTIPROCESSORS


@pytest.mark.parametrize("busy", [1, 8, 32, 128])
def test_a_small_batch_is_split_to_fill_one_wave(busy: int) -> None:
    splits = choose_num_splits(busy, 4096, RESIDENT, MULTIPROCESSORS)
    assert splits > 1 and busy * splits <= RESIDENT


@pytest.mark.parametrize(("busy", "context"), [(RESIDENT // 2 + 1, 4096), (512, 4096), (512, 512), (2048, 512), (2048, 1 << 17)])
def test_a_batch_that_fills_the_device_is_left_whole(busy: int, context: int) -> None:
    assert choose_num_splits(busy, context, RESIDENT, MULTIPROCESSORS) == 1


def test_no_piece_is_shorter_than_a_tile_and_no_count_past_the_maximum() -> None:
    assert choose_num_splits(8, KV_TILE - 1, RESIDENT, MULTIPROCESSORS) == 1
    assert choose_num_splits(8, 4 * KV_TILE, RESIDENT, MULTIPROCESSORS) == 4
    assert choose_num_splits(1, 1 << 20, RESIDENT, MULTIPROCESSORS) == MAX_SPLITS


def test_pieces_shorter_than_the_minimum_only_while_multiprocessors_would_idle() -> None:
    """Fewer (sequence, KV head) pairs than multiprocessors: split down to a
    tile, one block per multiprocessor. Otherwise pieces keep MIN_SPLIT_TOKENS."""
    assert choose_num_splits(33, 8 * KV_TILE, RESIDENT, MULTIPROCESSORS) == 4
    assert choose_num_splits(133, 8 * KV_TILE, RESIDENT, MULTIPROCESSORS) == 2
    assert choose_num_splits(133, MIN_SPLIT_TOKENS * 2 - 1, RESIDENT, MULTIPROCESSORS) == 1


def test_the_counts_the_h200_sweep_found_fastest() -> None:
    """docs/PERFORMANCE.md, split sweeps (Llama-3.1-8B heads: 8 KV heads)."""
    assert choose_num_splits(64 * 8, 4096, RESIDENT, MULTIPROCESSORS) == 1
    assert choose_num_splits(64 * 8, 512, RESIDENT, MULTIPROCESSORS) == 1
    assert choose_num_splits(16 * 8, 512, RESIDENT, MULTIPROCESSORS) == 2
    assert choose_num_splits(1 * 8, 4096, RESIDENT, MULTIPROCESSORS) == 16
    assert choose_num_splits(1 * 8, 512, RESIDENT, MULTIPROCESSORS) == 8


@pytest.mark.parametrize(
    ("max_query_len", "group", "rows"),
    [(1, 4, 8), (1, 8, 8), (2, 4, 8), (1, 9, 16), (1, 16, 16), (3, 4, 16), (5, 4, 32), (512, 4, 64), (1, 64, 64)],
)
def test_a_tile_takes_the_fewest_query_rows_that_hold_the_longest_chunk(max_query_len: int, group: int, rows: int) -> None:
    """Decodes of up to 8 query heads per KV head (and 2-token verify steps
    of 4) take the transposed 8-row tile; longer chunks row groups of 16."""
    assert choose_tile_rows(max_query_len, group) == rows


@pytest.mark.parametrize(("head_dim", "fp8_cache", "stages"), [(128, False, PIPELINE_STAGES), (128, True, NARROW_ROW_DECODE_STAGES), (64, False, NARROW_ROW_DECODE_STAGES)])
def test_decodes_over_narrow_rows_keep_a_deeper_ring(head_dim: int, fp8_cache: bool, stages: int) -> None:
    """A decode's ring (one query row group, transposed or not) deepens where
    K/V rows are 128 bytes or fewer; prefill chunks keep PIPELINE_STAGES."""
    assert pipeline_stages(head_dim, 8, fp8_cache) == stages
    assert pipeline_stages(head_dim, 16, fp8_cache) == stages
    assert pipeline_stages(head_dim, 32, fp8_cache) == PIPELINE_STAGES
    assert pipeline_stages(head_dim, 64, fp8_cache) == PIPELINE_STAGES


@pytest.mark.parametrize("busy", [1, RESIDENT, 4 * RESIDENT, 2048 * 8])
def test_one_wave_or_many_keep_the_most_blocks_per_multiprocessor(busy: int) -> None:
    assert choose_blocks_per_multiprocessor(busy, MULTIPROCESSORS, 3) == 3


def test_a_short_second_wave_is_evened_out_with_fewer_blocks_per_multiprocessor() -> None:
    """64 sequences x 8 KV heads take 1.29 waves at three blocks per
    multiprocessor and 1.94 at two (docs/PERFORMANCE.md, occupancy sweep)."""
    assert choose_blocks_per_multiprocessor(64 * 8, MULTIPROCESSORS, 3) == 2


@pytest.mark.parametrize(("busy", "most", "chosen"), [(256 * 3, 5, 3), (256 * 8, 5, 4), (256 * 8, 3, 3)])
def test_the_most_blocks_that_fill_the_waves_evenly(busy: int, most: int, chosen: int) -> None:
    """Ties go to more blocks per multiprocessor; four waves or more keep the most."""
    assert choose_blocks_per_multiprocessor(busy, MULTIPROCESSORS, most) == chosen


def test_a_fuller_last_wave_keeps_the_most_blocks() -> None:
    """1.9 waves at three blocks a multiprocessor: fewer cannot fill them much better."""
    assert choose_blocks_per_multiprocessor(int(RESIDENT * 1.9), MULTIPROCESSORS, 3) == 3


HOPPER_SHARED_PER_BLOCK = 227 * 1024
HOPPER_SHARED_PER_MULTIPROCESSOR = 228 * 1024


@pytest.mark.parametrize("fp8_cache", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tile_rows", [8, 16, 32, 64])
def test_every_pipeline_fits_a_multiprocessor_twice(tile_rows: int, head_dim: int, fp8_cache: bool) -> None:
    """Each layout's ring of K/V stages fits the shared memory of one block,
    and two blocks share a multiprocessor (one block's barrier waits are
    covered by the other's copies and math)."""
    shared = attention_shared_bytes(head_dim, tile_rows, fp8_cache)
    assert 2 * (shared + 1024) <= HOPPER_SHARED_PER_MULTIPROCESSOR  # 1 KiB reserved per block
    assert shared <= HOPPER_SHARED_PER_BLOCK


@pytest.mark.parametrize("head_dim", [64, 128])
def test_an_fp8_ring_holds_byte_rows_and_nothing_beside_them(head_dim: int) -> None:
    """The E4M3 rows are widened in registers, so the ring is all there is:
    K+V rows of head_dim bytes plus 16 of padding per stage, about half
    the 16-bit ring."""
    bf16, fp8 = attention_shared_bytes(head_dim, 64), attention_shared_bytes(head_dim, 64, fp8_cache=True)
    assert bf16 == PIPELINE_STAGES * 2 * KV_TILE * (head_dim + 8) * 2
    assert fp8 == PIPELINE_STAGES * 2 * KV_TILE * (head_dim + 16)
    assert fp8 < bf16 * 0.6


def test_a_cache_whose_block_size_is_not_a_power_of_two_is_refused_before_any_launch() -> None:
    """The kernel finds a token's slot with shifts and masks; the check needs no GPU."""
    query = torch.zeros(1, 32, 128, dtype=torch.bfloat16)
    cache = torch.zeros(4, 12, 8, 128, dtype=torch.bfloat16)
    one = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="block size must be a power of two, got 12"):
        paged_attention(query, cache, cache, torch.zeros(1, 1, dtype=torch.int32), one, torch.tensor([0, 1]), 0.1)
