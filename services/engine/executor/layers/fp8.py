"""FP8 (E4M3) linear layers: weights stored as float8_e4m3fn with one float32
scale per output channel (row), activations quantized per token in each
forward. On a GPU with FP8 tensor cores (compute capability 8.9 and up) the
GEMM runs in torch._scaled_mm with row-wise scales; elsewhere (the CPU, older
GPUs) the same quantized operands are dequantized and multiplied in the
activation dtype, so the numerics match and CI covers loading, scales and
layout."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pagewire.kernels import cuda_fp8_quant, cuda_gemv
from pagewire.kernels.reference import dequantize_rows, quantize_rows
from pagewire.services.common.logging import get_logger

log = get_logger("engine")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# torch._scaled_mm needs the inner and output dimensions in multiples of 16.
SCALED_MM_ALIGNMENT = 16


@functools.cache
def has_fp8_tensor_cores(device_index: int) -> bool:
    """Whether this GPU runs torch._scaled_mm (Ada and Hopper: sm_89 and up)."""
    supported = torch.cuda.get_device_capability(device_index) >= (8, 9)
    if not supported:
        log.warning("this GPU has no FP8 tensor cores: fp8 weights are dequantized in every forward (memory saved, no speed-up)")
    return supported


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the FP8 GEMM computes, through dequantization: x [tokens, in]
    quantized per token, times the fp8 weight [out, in] with its row scales."""
    x_q, x_scale = quantize_rows(x)
    out = F.linear(dequantize_rows(x_q, x_scale, torch.float32), dequantize_rows(weight, weight_scale, torch.float32))
    out = out.to(x.dtype)
    return out if bias is None else out + bias


def fp8_linear_scaled_mm(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, *, fast_accum: bool = True
) -> torch.Tensor:
    """The same product on FP8 tensor cores. Row-wise scaling takes scale_a
    [tokens, 1] and scale_b [1, out] in float32, the weight column-major (the
    transpose of a row-major [out, in]) and a bfloat16 output. The activations
    are quantized in one kernel (kernels/fp8_quant.cu) where it takes them.
    `fast_accum` keeps the tensor cores' own accumulation precision instead
    of promoting partial sums to float32: 2-19 % faster on an H200
    (benchmarks/fp8_linear.py measures both), within the accuracy bounds of
    tests/engine/test_fp8_accuracy.py."""
    x_q, x_scale = cuda_fp8_quant.quantize_rows(x) if cuda_fp8_quant.supports(x) else quantize_rows(x)
    out = torch._scaled_mm(
        x_q, weight.t(), scale_a=x_scale[:, None], scale_b=weight_scale[None, :], out_dtype=torch.bfloat16, use_fast_accum=fast_accum
    )
    out = out.to(x.dtype)
    return out if bias is None else out + bias


def fp8_linear_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A decode step's few tokens: the weight-only GEMV (kernels/gemv.cu)
    reads each FP8 weight once and keeps the activations in bf16, where
    _scaled_mm would first quantize them in several small kernels."""
    out = cuda_gemv.gemv(x, weight, weight_scale)
    return out if bias is None else out + bias


class Fp8Linear(nn.Module):
    """A projection with an FP8 weight [output_size, input_size] and its
    per-output-channel float32 `weight_scale` [output_size]; `bias` (if any)
    stays in the compute dtype. The loader fills weight and weight_scale
    (services/engine/executor/fp8_checkpoint.py)."""

    # Parameters the model's cast to the compute dtype must leave as they are.
    KEEPS_DTYPE = ("weight", "weight_scale")

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(output_size, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None
        self.aligned = input_size % SCALED_MM_ALIGNMENT == 0 and output_size % SCALED_MM_ALIGNMENT == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.input_size)
        on_tensor_cores = x.is_cuda and self.aligned and has_fp8_tensor_cores(x.get_device())
        product = fp8_linear_scaled_mm if on_tensor_cores else fp8_linear_reference
        if on_tensor_cores and cuda_gemv.supports(flat, self.weight):
            product = fp8_linear_gemv
        return product(flat, self.weight, self.weight_scale, self.bias).reshape(*x.shape[:-1], self.output_size)
