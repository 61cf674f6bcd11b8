"""kernels/layer_ops.py's operations on the GPU (kernels/layer_ops.cu), with
the same signatures and results, for bf16 and fp16 tensors whose last
dimension is contiguous. add_rms_norm updates `residual` in place and
rotary_embedding rotates query and key in place; both also return them."""

from __future__ import annotations

import numpy as np
import torch

from pagewire.kernels import loader

SOURCE = "layer_ops.cu"
KERNEL_TYPES = {torch.bfloat16: "Bf16", torch.float16: "Fp16"}
# 16-byte accesses: 8 elements of 16 bits.
VECTOR = 8
MAX_NORM_THREADS = 1024
SILU_THREADS = 128
MAX_ROTARY_THREADS = 128


def kernel_names() -> list[str]:
    """Every instantiation these operations can launch."""
    return [
        name
        for kind in KERNEL_TYPES.values()
        for vec in (1, VECTOR)
        for name in (
            f"rms_norm_kernel<{kind}, false, {vec}>",
            f"rms_norm_kernel<{kind}, true, {vec}>",
            f"rotary_embedding_kernel<{kind}, {vec}>",
            f"silu_and_mul_kernel<{kind}, {vec}>",
        )
    ]


def vector_width(width: int, *tensors: torch.Tensor) -> int:
    """8 when every row starts on a 16-byte boundary (a multiple of 8
    elements in each stride but the last) and the width is a multiple of 8
    elements, else 1."""
    aligned = width % VECTOR == 0 and all(t.data_ptr() % 16 == 0 and all(s % VECTOR == 0 for s in t.stride()[:-1]) for t in tensors)
    return VECTOR if aligned else 1


def _threads_for(work_items: int, most: int) -> int:
    """Enough whole warps for one round over work_items, at most `most`."""
    return min(most, max(32, -(-work_items // 32) * 32))


def kernel_kind(*tensors: torch.Tensor) -> str:
    dtype = tensors[0].dtype
    if dtype not in KERNEL_TYPES or any(t.dtype != dtype for t in tensors):
        raise ValueError(f"these kernels take bf16 or fp16 tensors of one dtype, got {[t.dtype for t in tensors]}")
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("the last dimension must be contiguous")
    return KERNEL_TYPES[dtype]


def _pointer(tensor: torch.Tensor) -> np.uint64:
    return np.uint64(tensor.data_ptr())


def _launch(name: str, grid: tuple[int, ...], threads: int, device: torch.device, args: tuple) -> None:  # type: ignore[type-arg]
    if grid[0]:
        loader.launch(loader.get_kernel(SOURCE, name), device, grid, (threads,), args)


def _rms_norm(out: torch.Tensor, residual: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    weight = weight.contiguous()
    kind = kernel_kind(x, weight, out, *(() if residual is None else (residual,)))
    with_residual = residual is not None
    residual = x if residual is None else residual
    hidden = x.shape[-1]
    vec = vector_width(hidden, out, residual, x, weight)
    _launch(
        f"rms_norm_kernel<{kind}, {'true' if with_residual else 'false'}, {vec}>",
        (x.shape[0],),
        _threads_for(hidden // vec, MAX_NORM_THREADS),
        x.device,
        (
            _pointer(out), _pointer(residual), _pointer(x), _pointer(weight), np.int32(x.shape[-1]),
            np.int64(x.stride(0)), np.int64(residual.stride(0)), np.int64(out.stride(0)), np.float32(eps),
        ),
    )  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """kernels/layer_ops.py: rms_norm, for x [num_tokens, hidden]."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _rms_norm(out, None, x, weight, eps)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels/layer_ops.py: add_rms_norm, for x and residual [num_tokens, hidden];
    the sum is written into residual."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _rms_norm(out, residual, x, weight, eps)
    return out, residual


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels/layer_ops.py: rotary_embedding, in place on query and key."""
    kind = kernel_kind(query, key)
    num_tokens, num_heads, head_dim = query.shape
    positions = positions.to(torch.int64).contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    vec = vector_width(head_dim // 2, query, key)
    pieces = (num_heads + key.shape[1]) * (head_dim // 2 // vec)
    threads = _threads_for(pieces, MAX_ROTARY_THREADS)
    _launch(
        f"rotary_embedding_kernel<{kind}, {vec}>",
        (num_tokens, -(-pieces // threads)),
        threads,
        query.device,
        (
            _pointer(query), _pointer(key), _pointer(positions), _pointer(cos), _pointer(sin),
            np.int32(num_heads), np.int32(key.shape[1]), np.int32(head_dim),
            np.int64(query.stride(0)), np.int64(query.stride(1)), np.int64(key.stride(0)), np.int64(key.stride(1)),
        ),
    )  # fmt: skip
    return query, key


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """kernels/layer_ops.py: silu_and_mul, for gate_up [num_tokens, 2 * width]."""
    kind = kernel_kind(gate_up)
    width = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], width, dtype=gate_up.dtype, device=gate_up.device)
    vec = vector_width(width, gate_up, out)
    slices = -(-width // (SILU_THREADS * vec))
    _launch(
        f"silu_and_mul_kernel<{kind}, {vec}>",
        (gate_up.shape[0], slices),
        SILU_THREADS,
        gate_up.device,
        (_pointer(out), _pointer(gate_up), np.int32(width), np.int64(gate_up.stride(0))),
    )
    return out
