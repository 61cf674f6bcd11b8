"""Torch reference implementations of kernels/layer_ops.cu: the small
operations of a decoder layer around its GEMMs and attention. These are the
definitions the CUDA kernels are tested against, and what the engine runs on
the CPU. They compute in the order and precision HF transformers' Llama does
(fp32 inside RMSNorm, 16-bit elsewhere), so greedy outputs agree with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dimension, normalised in fp32."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a sublayer's output joins the
    residual stream, which the next sublayer reads normalised."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads,
    head_dim] rotated by each token's position (rotate-half layout). cos/sin:
    fp32 tables [max_positions, head_dim]. The CUDA version rotates in place;
    callers use the returned tensors."""
    cos_rows = cos[positions].unsqueeze(1).to(query.dtype)
    sin_rows = sin[positions].unsqueeze(1).to(query.dtype)
    return query * cos_rows + _rotate_half(query) * sin_rows, key * cos_rows + _rotate_half(key) * sin_rows


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
