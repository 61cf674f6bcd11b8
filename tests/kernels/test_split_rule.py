"""The context-split rule of the GPU attention (kernels/cuda_ops.py), which is
plain arithmetic and runs on the CPU, at an H100's figures: 132
multiprocessors, 396 resident decode blocks at head_dim 128, 660 at 64."""

from __future__ import annotations

import pytest

from pagewire.kernels.cuda_ops import MAX_SPLITS, MIN_SPLIT_TOKENS, TARGET_WAVES, choose_num_splits

MULTIPROCESSORS = 132


@pytest.mark.parametrize("resident", [396, 660])
@pytest.mark.parametrize("busy", [3, 8, 32, 128, 384])
def test_a_batch_that_fits_in_one_wave_stays_in_one_wave(resident: int, busy: int) -> None:
    splits = choose_num_splits(busy, 1 << 20, resident, MULTIPROCESSORS)
    assert busy * splits <= resident
    # ... and fills the device about twice over, or as far as residency allows.
    assert busy * splits >= min(2 * MULTIPROCESSORS, resident - busy + 1) or splits == MAX_SPLITS


@pytest.mark.parametrize(("resident", "busy"), [(396, 512), (396, 1024), (660, 768), (660, 1024)])
def test_a_batch_past_one_wave_is_split_into_several(resident: int, busy: int) -> None:
    splits = choose_num_splits(busy, 1 << 20, resident, MULTIPROCESSORS)
    assert splits > 1 and busy * splits >= TARGET_WAVES * resident


def test_large_batches_and_short_contexts_are_not_split() -> None:
    assert choose_num_splits(256 * 8, 8192, 396, MULTIPROCESSORS) == 1
    assert choose_num_splits(8, MIN_SPLIT_TOKENS - 1, 396, MULTIPROCESSORS) == 1
    # No piece shorter than MIN_SPLIT_TOKENS, however idle the device.
    assert choose_num_splits(1, 4 * MIN_SPLIT_TOKENS, 396, MULTIPROCESSORS) == 4
