"""kernels/fp8_gemv.cu on torch tensors: the weight-only FP8 product of a
decode step's few tokens (kernels/reference.py: fp8_weight_gemv)."""

from __future__ import annotations

import numpy as np
import torch

from pagewire.kernels import loader

SOURCE = "fp8_gemv.cu"
# Rows of x it takes. On an H200 (benchmarks/fp8_linear.py) it reads
# llama-8b's projections 1.6-1.9x faster than the bf16 GEMM at one token and
# still beats it at two; at four it is level, at eight twice as slow (its
# float FMAs per weight byte grow with the rows), so larger batches go to
# the GEMM.
MAX_TOKENS = 2
ROWS_PER_BLOCK = 8  # GEMV_WARPS in the source
ALIGNMENT = 16


def kernel_names() -> list[str]:
    return [f"fp8_gemv_kernel<{m}>" for m in range(1, MAX_TOKENS + 1)]


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether fp8_gemv takes these: bf16 x of at most MAX_TOKENS rows, K a multiple of 16."""
    return x.dtype == torch.bfloat16 and x.dim() == 2 and 0 < x.shape[0] <= MAX_TOKENS and weight.shape[1] % ALIGNMENT == 0


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [m, k] bf16, weight [n, k] float8_e4m3fn, scale [n] float32 -> [m, n] bf16."""
    if not supports(x, weight):
        raise ValueError(f"fp8_gemv takes bf16 x of 1..{MAX_TOKENS} rows and K % {ALIGNMENT} == 0, got {x.dtype} {tuple(x.shape)}")
    x, weight, scale = x.contiguous(), weight.contiguous(), scale.float().contiguous()
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    kernel = loader.get_kernel(SOURCE, f"fp8_gemv_kernel<{m}>")
    args = tuple(np.uint64(t.data_ptr()) for t in (out, x, weight, scale)) + (np.int32(n), np.int32(k))
    loader.launch(kernel, x.device, (-(-n // ROWS_PER_BLOCK),), (ROWS_PER_BLOCK * 32,), args)
    return out
