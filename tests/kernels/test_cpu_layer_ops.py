"""The CPU engine's layer operations (kernels/cpu_layer_ops.py) equal their
torch references (kernels/layer_ops.py) bit for bit, on inputs laid out as
the model hands them over: query and key as views of the fused QKV output,
or as separate tensors (models with per-head norms), in float32 and bf16."""

from __future__ import annotations

import pytest
import torch

from pagewire.kernels import cpu_layer_ops, layer_ops

DTYPES = [torch.float32, torch.bfloat16]


def _qkv_views(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """query, key and value as Attention.forward splits them off one projection output."""
    generator = torch.Generator().manual_seed(num_heads * head_dim)
    fused = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(dtype)
    query, key, value = fused.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return query.view(num_tokens, num_heads, head_dim), key.view(num_tokens, num_kv_heads, head_dim), value


def _tables(head_dim: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    inverse_frequencies = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_positions).float(), inverse_frequencies).repeat(1, 2)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim", [(1, 9, 3, 64), (37, 9, 3, 64), (5, 32, 8, 128)])
@pytest.mark.parametrize("side_by_side", [True, False])
def test_rotary_embedding_equals_the_reference(
    dtype: torch.dtype, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, side_by_side: bool
) -> None:
    query, key, value = _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    if not side_by_side:  # as after per-head norms: separate tensors
        query, key = query.clone(), key.clone()
    value_before = value.clone()
    cos, sin = _tables(head_dim, 4096)
    positions = torch.randint(0, 4096, (num_tokens,), generator=torch.Generator().manual_seed(7))
    expected_query, expected_key = layer_ops.rotary_embedding(positions, query, key, cos, sin)
    rotated_query, rotated_key = cpu_layer_ops.rotary_embedding(positions, query, key, cos, sin)
    assert rotated_query.shape == query.shape and rotated_key.shape == key.shape
    assert torch.equal(rotated_query, expected_query) and torch.equal(rotated_key, expected_key)
    assert torch.equal(value, value_before)


def test_query_and_key_rotate_as_one_tensor_only_when_side_by_side() -> None:
    query, key, value = _qkv_views(4, 9, 3, 64, torch.float32)
    both = cpu_layer_ops._side_by_side(query, key)
    assert both is not None and both.shape == (4, 12, 64) and torch.equal(both[:, 9:], key)
    assert cpu_layer_ops._side_by_side(query, value.view(4, 3, 64)) is None  # v does not follow q
    assert cpu_layer_ops._side_by_side(query.clone(), key) is None
    assert cpu_layer_ops._side_by_side(query, key.clone()) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 576), (32, 576), (300, 2048), (3, 1000)])
def test_rms_norms_equal_the_reference(dtype: torch.dtype, num_tokens: int, hidden: int) -> None:
    generator = torch.Generator().manual_seed(hidden + num_tokens)
    x = (torch.randn(num_tokens, hidden, generator=generator) * 3).to(dtype)
    residual = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    weight = (torch.rand(hidden, generator=generator) + 0.5).to(dtype)
    assert torch.equal(cpu_layer_ops.rms_norm(x, weight, 1e-5), layer_ops.rms_norm(x, weight, 1e-5))
    out, summed = cpu_layer_ops.add_rms_norm(x, residual, weight, 1e-6)
    expected_out, expected_summed = layer_ops.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(out, expected_out) and torch.equal(summed, expected_summed)
