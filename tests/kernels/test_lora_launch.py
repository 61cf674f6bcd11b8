"""The host side of the LoRA kernels (kernels/cuda_lora.py), on the CPU: how
the shrink's grid covers the tokens, the input and the shrunk columns, and
where the parts of a fused projection start."""

from __future__ import annotations

import pytest

from pagewire.kernels import cuda_lora
from pagewire.kernels.cuda_lora import SHRINK_STAGE, THREADS, TOKENS_PER_BLOCK, part_starts, shrink_launch

H200_MULTIPROCESSORS = 132


@pytest.mark.parametrize("num_tokens", [1, 17, 256, 8192])
@pytest.mark.parametrize("input_size", [64, 1000, 2048, 14336])
@pytest.mark.parametrize("width", [1, 48, 256, 300])
def test_shrink_launch_covers_every_token_input_column_and_shrunk_column(num_tokens: int, input_size: int, width: int) -> None:
    launch = shrink_launch(num_tokens, input_size, width, H200_MULTIPROCESSORS)
    tiles, splits, column_groups = launch.grid
    assert tiles * TOKENS_PER_BLOCK >= num_tokens > (tiles - 1) * TOKENS_PER_BLOCK
    # Whole stages per split, and no split past the input (each writes its partial row).
    assert launch.k_per_split % SHRINK_STAGE == 0
    assert splits * launch.k_per_split >= input_size > (splits - 1) * launch.k_per_split
    assert column_groups * launch.columns_per_block >= width > (column_groups - 1) * launch.columns_per_block
    assert 1 <= launch.columns_per_block <= THREADS
    assert splits <= 65535 and column_groups <= 65535  # grid y and z limits


def test_shrink_splits_the_input_for_a_decode_step_and_not_for_a_prefill_chunk() -> None:
    one_token = shrink_launch(1, 8192, 48, H200_MULTIPROCESSORS)
    assert one_token.splits == 8192 // SHRINK_STAGE  # one stage per block: 32 blocks
    prefill = shrink_launch(8192, 8192, 48, H200_MULTIPROCESSORS)
    assert prefill.splits == 1 and prefill.grid[0] == 8192 // TOKENS_PER_BLOCK
    # 16 tiles of a 256-token batch want 17 splits: as many as the stages allow.
    assert shrink_launch(256, 2048, 48, H200_MULTIPROCESSORS).splits == 2048 // SHRINK_STAGE


def test_part_starts_of_fused_and_single_projections() -> None:
    assert part_starts([2048, 512, 512]) == (2048, 2560)
    assert part_starts([8192, 8192]) == (8192, 16384)
    assert part_starts([2048]) == (2048, 2048)
    with pytest.raises(ValueError, match="1 to 3 fused parts"):
        part_starts([1, 1, 1, 1])


def test_every_kernel_is_listed() -> None:
    assert cuda_lora.kernel_names() == [
        "lora_shrink_kernel<Bf16>", "lora_expand_kernel<Bf16>", "lora_shrink_kernel<Fp16>", "lora_expand_kernel<Fp16>",
    ]  # fmt: skip
