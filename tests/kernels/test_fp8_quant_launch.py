"""The host side of the FP8 quantization kernel (kernels/cuda_fp8_quant.py),
which runs on the CPU: its launch shapes cover every element of every row
once, with whole warps (the kernel's full-warp reductions need them), and
its constants agree with the source and with torch's arithmetic."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pagewire.kernels import cuda_fp8_quant
from pagewire.kernels.cuda_fp8_quant import MAX_THREADS, ROW_WARPS, launch_config
from pagewire.kernels.loader import KERNEL_DIR
from pagewire.kernels.reference import FP8_MAX


def elements_visited(rows: int, hidden: int, vec: int) -> np.ndarray:
    """How often the kernel's index arithmetic touches each (row, element)
    under launch_config, as quantize_rows_kernel computes it."""
    config = launch_config(rows, hidden, vec)
    visits = np.zeros((rows, hidden), dtype=np.int64)
    for block in range(config.blocks):
        for thread in range(config.threads):
            lane = thread % 32
            row = block * ROW_WARPS + thread // 32 if config.warp_per_row else block
            if row >= rows:
                continue
            first = (lane if config.warp_per_row else thread) * vec
            step = (32 if config.warp_per_row else config.threads) * vec
            for i in range(first, hidden, step):
                visits[row, i : i + vec] += 1
    return visits


@pytest.mark.parametrize(("rows", "hidden", "vec"), [(1, 64, 8), (3, 100, 1), (9, 1024, 8), (2, 1032, 8), (3, 4096, 8), (2, 14336, 8), (2, 1000, 1), (2, 5000, 1)])
def test_every_element_is_quantized_once(rows: int, hidden: int, vec: int) -> None:
    assert (elements_visited(rows, hidden, vec) == 1).all()


@pytest.mark.parametrize("hidden", [1, 64, 100, 1000, 1024, 1032, 4096, 14336, 100_000])
@pytest.mark.parametrize("vec", [1, 8])
def test_blocks_are_whole_warps_within_the_limits(hidden: int, vec: int) -> None:
    if hidden % vec:
        pytest.skip("16-byte accesses only for widths in multiples of 8")
    config = launch_config(257, hidden, vec)
    assert config.threads % 32 == 0 and 32 <= config.threads <= MAX_THREADS  # warp_max holds 32 partials
    if config.warp_per_row:
        assert config.threads == ROW_WARPS * 32 and config.blocks * ROW_WARPS >= 257
    else:
        assert config.blocks == 257


def test_narrow_rows_take_a_warp_and_wide_rows_a_block() -> None:
    assert launch_config(4, 576, 8).warp_per_row  # SmolLM2-135M's hidden size
    assert not launch_config(4, 4096, 8).warp_per_row
    assert launch_config(4, 4096, 8).threads == 512  # one 16-byte access per thread
    assert launch_config(4, 14336, 8).threads == MAX_THREADS


def test_rows_per_block_match_the_source() -> None:
    source = (KERNEL_DIR / cuda_fp8_quant.SOURCE).read_text()
    assert int(re.search(r"constexpr int QUANT_WARPS = (\d+);", source).group(1)) == ROW_WARPS


def test_inverse_max_is_the_float_reciprocal_torch_multiplies_by() -> None:
    assert cuda_fp8_quant.INVERSE_MAX == torch.tensor(1.0, dtype=torch.float32) / torch.tensor(FP8_MAX, dtype=torch.float32)


def test_only_16_bit_rows_on_the_gpu_are_taken() -> None:
    assert not cuda_fp8_quant.supports(torch.zeros(2, 64, dtype=torch.bfloat16))  # on the CPU
    with pytest.raises(ValueError, match="at least one element"):
        cuda_fp8_quant.quantize_rows(torch.zeros(2, 0, dtype=torch.bfloat16))
