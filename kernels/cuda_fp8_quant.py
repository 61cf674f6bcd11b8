"""kernels/fp8_quant.cu on torch tensors: the per-token FP8 quantization of a
linear layer's activations in front of torch._scaled_mm, in one kernel and
bit for bit what kernels/reference.py: quantize_rows computes on the GPU."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagewire.kernels import loader
from pagewire.kernels.cuda_layer_ops import KERNEL_TYPES, VECTOR, kernel_kind, vector_width
from pagewire.kernels.reference import FP8_CACHE_DTYPE, FP8_MAX, MIN_SCALE

SOURCE = "fp8_quant.cu"
ROW_WARPS = 8  # QUANT_WARPS in the source: rows per block when a warp takes a row
# A row a warp reads in at most this many accesses per lane takes one warp;
# wider rows take a block each (the source's header says why).
WARP_ROW_ACCESSES_PER_LANE = 4
MAX_THREADS = 1024
# torch divides by the Python scalar FP8_MAX as a product with this float.
INVERSE_MAX = np.float32(1.0) / np.float32(FP8_MAX)


@dataclass(frozen=True)
class LaunchConfig:
    warp_per_row: bool
    blocks: int
    threads: int


def launch_config(rows: int, hidden: int, vec: int) -> LaunchConfig:
    """A warp per row (ROW_WARPS rows to a block) for narrow rows, else a
    block per row with enough whole warps for one round of vec-element
    accesses, at most MAX_THREADS."""
    accesses = -(-hidden // vec)
    if accesses <= WARP_ROW_ACCESSES_PER_LANE * 32:
        return LaunchConfig(warp_per_row=True, blocks=-(-rows // ROW_WARPS), threads=ROW_WARPS * 32)
    return LaunchConfig(warp_per_row=False, blocks=rows, threads=min(MAX_THREADS, -(-accesses // 32) * 32))


def kernel_name(kind: str, vec: int, warp_per_row: bool) -> str:
    return f"quantize_rows_kernel<{kind}, {vec}, {'true' if warp_per_row else 'false'}>"


def kernel_names() -> list[str]:
    """Every instantiation quantize_rows can launch."""
    return [kernel_name(kind, vec, warp) for kind in KERNEL_TYPES.values() for vec in (1, VECTOR) for warp in (False, True)]


def supports(x: torch.Tensor) -> bool:
    """Whether quantize_rows takes x: bf16 or fp16 rows [rows, hidden] on the
    GPU with the last dimension contiguous."""
    return x.is_cuda and x.dtype in KERNEL_TYPES and x.dim() == 2 and x.stride(-1) == 1


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, hidden] bf16/fp16 -> (q [rows, hidden] float8_e4m3fn, scale [rows] float32)."""
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"quantize_rows takes rows [rows, hidden] of at least one element, got shape {tuple(x.shape)}")
    kind = kernel_kind(x)
    rows, hidden = x.shape
    q = torch.empty(rows, hidden, dtype=FP8_CACHE_DTYPE, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        vec = vector_width(hidden, x)
        config = launch_config(rows, hidden, vec)
        args = (
            np.uint64(q.data_ptr()), np.uint64(scale.data_ptr()), np.uint64(x.data_ptr()),
            np.int32(rows), np.int32(hidden), np.int64(x.stride(0)), INVERSE_MAX, np.float32(MIN_SCALE),
        )  # fmt: skip
        kernel = loader.get_kernel(SOURCE, kernel_name(kind, vec, config.warp_per_row))
        loader.launch(kernel, x.device, (config.blocks,), (config.threads,), args)
    return q, scale
