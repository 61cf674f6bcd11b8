"""The one place the model's projections are made, so that other kinds of
linear layer (quantized weights, adapters, weights split across devices) have
a single point to plug in where every model picks them up."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pagewire.kernels import cuda_gemv
from pagewire.services.engine.executor.layers.fp8 import Fp8Linear

# Weight formats of the projections: "none" keeps the compute dtype.
QUANTIZATIONS = ("none", "fp8")

# oneDNN's inner product over a weight reordered once, ahead of time, into
# its blocked layout. On a 2-core AMD EPYC (docs/PERFORMANCE.md, CPU chats)
# torch's float32 F.linear goes to MKL, which took 2-5x as long at 1-8 rows
# (the embedded model's LM head at 2 rows: 22.8 against 5.6 ms) and 1.3-2.3x
# at 32; bfloat16, already oneDNN's, still gained 1.35-1.5x from the reorder.
PREPACKED_DTYPES = (torch.float32, torch.bfloat16)
# The row count oneDNN picks its weight layout for: 32 and 256 measured alike
# from 1 to 300 rows, 1 was slower from 2 rows on.
PREPACK_ROWS_HINT = 32


def linear(input_size: int, output_size: int, *, bias: bool = False, quantization: str = "none") -> nn.Module:
    """A projection from input_size to output_size features; its parameters
    are `weight` [output_size, input_size] and, with bias, `bias`, under the
    names checkpoints use; fp8 adds `weight_scale` [output_size]
    (layers/fp8.py)."""
    if quantization == "fp8":
        return Fp8Linear(input_size, output_size, bias=bias)
    if quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r} (known: {', '.join(QUANTIZATIONS)})")
    return Linear(input_size, output_size, bias=bias)


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias. A decode step's few rows on the GPU go through
    the GEMV (kernels/gemv.cu), which starts its weight stream while the
    kernel before it finishes; the rest through torch's GEMM."""
    flat = x.reshape(-1, weight.shape[1])
    if not cuda_gemv.supports(flat, weight):
        return F.linear(x, weight, bias)
    out = cuda_gemv.gemv(flat, weight)
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (its parameters and initialisation) computed by project()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias)


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether PrepackedLinear takes this weight: on the CPU, in a dtype oneDNN computes here."""
    return weight.device.type == "cpu" and weight.dtype in PREPACKED_DTYPES and _onednn_computes(weight.dtype)


@functools.cache
def _onednn_computes(dtype: torch.dtype) -> bool:
    """This torch's oneDNN reorders and multiplies in dtype on this CPU. Asked
    once per dtype with a small product, so that a torch build or a CPU
    where that path fails keeps torch's own GEMM instead of failing at start."""
    if not torch.backends.mkldnn.is_available():
        return False
    weight, x = torch.ones(16, 16, dtype=dtype), torch.ones(2, 16, dtype=dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PREPACK_ROWS_HINT)
        product = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(product, F.linear(x, weight)))


class PrepackedLinear(nn.Module):
    """x @ weight.T + bias on the CPU through oneDNN, the weight held only in
    oneDNN's blocked layout. `weight` stays a parameter on the meta device,
    so its shape and dtype (which adapters and reports read) remain while its
    values live once, in the packed copy; state_dict() unpacks them."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not can_prepack(weight):
            raise ValueError(f"PrepackedLinear takes a CPU weight in {PREPACKED_DTYPES} that oneDNN computes here, got {weight.dtype} on {weight.device}")
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PREPACK_ROWS_HINT)
        self.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.packed.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


def prepack_projections(model: nn.Module) -> int:
    """Replace every nn.Linear or Linear under `model` whose weight can_prepack with a
    PrepackedLinear (in place, once: those already packed are left as they
    are); returns how many were replaced."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (nn.Linear, Linear) and can_prepack(child.weight):
                setattr(module, name, PrepackedLinear(child.weight, child.bias))
                replaced += 1
    return replaced
