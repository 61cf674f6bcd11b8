"""kernels/gemv.cu on torch tensors: a decode step's few tokens times a
projection's weight, bf16 or float8 with row scales (kernels/reference.py:
weight_gemv, fp8_weight_gemv)."""

from __future__ import annotations

import numpy as np
import torch

from pagewire.kernels import loader

SOURCE = "gemv.cu"
# Rows of x each weight format takes. On an H200 (benchmarks/fp8_linear.py,
# docs/PERFORMANCE.md) the FP8 GEMV reads llama-8b's projections 1.6-1.9x
# faster than the bf16 GEMM at one token and still beats it at two; at four
# it is level, at eight twice as slow (its float FMAs per weight byte grow
# with the rows). The bf16 GEMV is level with the GEMM at one and two tokens
# alone and faster in a step, where it starts before the kernel ahead of it
# ends; at four it took 1.1-2.4x the GEMM. Larger batches go to the GEMM.
MAX_TOKENS = {"bf16": 2, "fp8": 2}
ROWS = {"bf16": "Bf16Rows", "fp8": "E4m3Rows"}
WEIGHTS_PER_LOAD = {"bf16": 8, "fp8": 16}  # the kernel's 16-byte loads
ROWS_PER_BLOCK = 8  # GEMV_WARPS in the source
WEIGHT_DTYPES = {torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8"}


def kernel_name(weights: str, m: int) -> str:
    return f"gemv_kernel<{ROWS[weights]}, {m}>"


def kernel_names() -> list[str]:
    return [kernel_name(weights, m) for weights, most in MAX_TOKENS.items() for m in range(1, most + 1)]


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the GEMV takes these: bf16 x of at most MAX_TOKENS rows on the
    GPU, a bf16 or float8 weight whose rows are whole 16-byte loads."""
    weights = WEIGHT_DTYPES.get(weight.dtype)
    return (
        weights is not None
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_TOKENS[weights]
        and weight.shape[1] % WEIGHTS_PER_LOAD[weights] == 0
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] bf16 times weight [n, k] (bf16, or float8_e4m3fn with its
    float32 row scales `scale` [n]) -> [m, n] bf16."""
    if not supports(x, weight):
        most = " or ".join(f"{rows} ({weights} weights)" for weights, rows in MAX_TOKENS.items())
        raise ValueError(
            f"the GEMV takes bf16 x on the GPU with at most {most} rows, and weight rows of whole 16-byte loads;"
            f" got x {x.dtype} {tuple(x.shape)} on {x.device}, weight {weight.dtype} {tuple(weight.shape)}"
        )
    weights = WEIGHT_DTYPES[weight.dtype]
    if (scale is None) == (weights == "fp8"):
        raise ValueError("float8 weights take their row scales, bf16 weights none")
    x, weight = x.contiguous(), weight.contiguous()
    scale = None if scale is None else scale.float().contiguous()
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    scale_pointer = 0 if scale is None else scale.data_ptr()
    kernel = loader.get_kernel(SOURCE, kernel_name(weights, m))
    args = tuple(np.uint64(pointer) for pointer in (out.data_ptr(), x.data_ptr(), weight.data_ptr(), scale_pointer)) + (np.int32(n), np.int32(k))
    loader.launch(kernel, x.device, (-(-n // ROWS_PER_BLOCK),), (ROWS_PER_BLOCK * 32,), args)
    return out
