"""The fused layer kernels (kernels/layer_ops.cu) equal their torch references
(kernels/layer_ops.py) on inputs laid out as the model hands them over:
rows of a wider fused projection, odd hidden sizes, bf16 and fp16. They round
where the reference rounds, so they agree to within one 16-bit step (only
rsqrt and exp differ, being the fast-math versions)."""

from __future__ import annotations

import pytest
import torch

from pagewire.kernels import cuda_layer_ops, layer_ops

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]


def assert_within_one_step(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    step = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=step, atol=step)
    # Most elements round identically; a differing rsqrt/exp moves only a few.
    assert (actual == expected).float().mean() > 0.95


def rows_of_a_wider_tensor(num_tokens: int, width: int, dtype: torch.dtype, seed: int, offset: int = 32) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    wide = torch.randn(num_tokens, width + 64, device="cuda", generator=generator).to(dtype)
    return wide[:, offset : offset + width]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 2048, 4096, 1000])
def test_rms_norm_matches_reference(dtype: torch.dtype, hidden: int) -> None:
    x = rows_of_a_wider_tensor(37, hidden, dtype, seed=hidden) * 3
    weight = (torch.rand(hidden, device="cuda") + 0.5).to(dtype)
    assert_within_one_step(cuda_layer_ops.rms_norm(x, weight, 1e-5), layer_ops.rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096])
def test_add_rms_norm_matches_reference_and_updates_the_residual(dtype: torch.dtype, hidden: int) -> None:
    x = rows_of_a_wider_tensor(21, hidden, dtype, seed=1)
    residual = rows_of_a_wider_tensor(21, hidden, dtype, seed=2).contiguous()
    weight = (torch.rand(hidden, device="cuda") + 0.5).to(dtype)
    expected_out, expected_residual = layer_ops.add_rms_norm(x, residual.clone(), weight, 1e-6)
    out, new_residual = cuda_layer_ops.add_rms_norm(x, residual, weight, 1e-6)
    assert new_residual.data_ptr() == residual.data_ptr()
    assert torch.equal(residual, expected_residual)  # one rounded add, as torch does it
    assert_within_one_step(out, expected_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("num_tokens", [1, 45, 2050])
@pytest.mark.parametrize("row_offset", [32, 33])  # 33: rows off the 16-byte grid, rotated an element at a time
def test_rotary_embedding_matches_reference_in_place(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, num_tokens: int, row_offset: int
) -> None:
    max_positions = 4096
    fused = rows_of_a_wider_tensor(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype, seed=3, offset=row_offset)
    query = fused[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    key = fused[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value_before = fused[:, (num_heads + num_kv_heads) * head_dim :].clone()
    inverse_frequencies = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
    angles = torch.outer(torch.arange(max_positions, device="cuda").float(), inverse_frequencies).repeat(1, 2)
    positions = torch.randint(0, max_positions, (num_tokens,), device="cuda")
    assert cuda_layer_ops.vector_width(head_dim // 2, query, key) == (8 if row_offset % 8 == 0 else 1)
    expected_query, expected_key = layer_ops.rotary_embedding(positions, query.clone(), key.clone(), angles.cos(), angles.sin())
    rotated_query, rotated_key = cuda_layer_ops.rotary_embedding(positions, query, key, angles.cos(), angles.sin())
    assert rotated_query.data_ptr() == query.data_ptr() and rotated_key.data_ptr() == key.data_ptr()
    # Only products and one sum, each rounded as the reference rounds them.
    assert torch.equal(query, expected_query) and torch.equal(key, expected_key)
    assert torch.equal(fused[:, (num_heads + num_kv_heads) * head_dim :], value_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1536, 8192, 100])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, width: int) -> None:
    gate_up = rows_of_a_wider_tensor(19, 2 * width, dtype, seed=width) * 4
    assert_within_one_step(cuda_layer_ops.silu_and_mul(gate_up), layer_ops.silu_and_mul(gate_up))


def test_mismatched_dtypes_are_refused() -> None:
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        cuda_layer_ops.rms_norm(x, torch.ones(64, device="cuda", dtype=torch.float16), 1e-6)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        cuda_layer_ops.silu_and_mul(x.float())
