"""The FP8 paths on the GPU: the FP8 KV cache kernels (reshape-and-cache and
paged attention, decodes and prefill chunks, one and many context splits,
bf16 and fp16) against the torch reference on the same FP8 cache, and the
FP8 linear layer on tensor cores against its dequantized reference."""

from __future__ import annotations

import math

import pytest
import torch

from pagewire.kernels import cuda_ops, reference
from pagewire.services.engine.executor.layers.fp8 import Fp8Linear, fp8_linear_reference, quantize_rows

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
BATCHES = {
    "decode": ([1] * 6, [1, 16, 17, 300, 1000, 2053]),
    "mixed": ([1, 37, 1, 128, 5, 0, 64], [50, 37, 700, 400, 5, 0, 1100]),
}


def _fp8_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


needs_fp8 = pytest.mark.skipif(not _fp8_supported(), reason="needs a GPU with FP8 (sm_89+)")


def _tables(context_lens: list[int], block_size: int, seed: int) -> tuple[torch.Tensor, int]:
    torch.manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 5
    tables = torch.randint(0, num_blocks, (len(context_lens), max(blocks_per_seq) + 2), dtype=torch.int32)
    shuffled = torch.randperm(num_blocks, dtype=torch.int32)
    used = 0
    for seq, count in enumerate(blocks_per_seq):
        tables[seq, :count] = shuffled[used : used + count]
        used += count
    return tables.cuda(), num_blocks


def _fp8_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """Random values in the range a cache of this scale holds (unused slots too)."""
    values = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda") * 3
    return reference.to_cache_dtype(values, FP8, scale)


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_reshape_and_cache_fp8_matches_reference(dtype: torch.dtype, head_dim: int) -> None:
    torch.manual_seed(0)
    num_tokens, num_kv_heads, num_blocks, block_size = 70, 8, 12, 16
    key = (torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda") * 100).to(dtype)  # some saturate at k_scale 0.2
    value = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda").to(dtype)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[3] = -1
    caches = {name: torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=FP8, device="cuda") for name in ("cuda", "reference")}
    scales = {"k_scale": 0.2, "v_scale": 0.01}
    cuda_ops.reshape_and_cache(key, value, caches["cuda"][0], caches["cuda"][1], slots, **scales)
    reference.reshape_and_cache(key, value, caches["reference"][0], caches["reference"][1], slots, **scales)
    actual, expected = caches["cuda"].float(), caches["reference"].float()
    # The kernel divides with fast math: a value on a rounding boundary may land one E4M3 step away.
    torch.testing.assert_close(actual, expected, rtol=2**-3, atol=2**-9)
    assert (actual == expected).float().mean() > 0.999


@needs_fp8
@pytest.mark.parametrize("num_splits", [None, 1, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_paged_attention_reads_an_fp8_cache_as_the_reference(
    kind: str, head_dim: int, dtype: torch.dtype, num_splits: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if num_splits is not None:
        monkeypatch.setattr(cuda_ops, "choose_num_splits", lambda *args: num_splits)
    query_lens, context_lens = BATCHES[kind]
    num_heads, num_kv_heads, block_size = 32, 8, 16
    block_tables, num_blocks = _tables(context_lens, block_size, seed=head_dim)
    k_scale, v_scale = 0.05, 0.02
    key_cache = _fp8_cache(num_blocks, block_size, num_kv_heads, head_dim, k_scale)
    value_cache = _fp8_cache(num_blocks, block_size, num_kv_heads, head_dim, v_scale)
    query = torch.randn(sum(query_lens), num_heads, head_dim, device="cuda").to(dtype)
    seq_lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    args = (block_tables, seq_lens, starts, head_dim**-0.5)
    actual = cuda_ops.paged_attention(query, key_cache, value_cache, *args, k_scale=k_scale, v_scale=v_scale)
    expected = reference.paged_attention(query.float(), key_cache, value_cache, *args, k_scale=k_scale, v_scale=v_scale)
    assert torch.isfinite(actual).all()
    relative_error = (actual.float() - expected).norm() / expected.norm()
    assert relative_error < 1e-2, f"relative error {relative_error:.2e}"
    torch.testing.assert_close(actual.float(), expected, atol=3e-2, rtol=3e-2)


@needs_fp8
def test_fp8_cache_attention_inside_a_cuda_graph() -> None:
    """Scales are kernel arguments fixed at capture, as the engine's graphs use them."""
    context_lens = [33, 500, 7, 1200]  # four decodes
    block_tables, num_blocks = _tables(context_lens, 16, seed=1)
    key_cache = _fp8_cache(num_blocks, 16, 8, 128, 0.5)
    value_cache = _fp8_cache(num_blocks, 16, 8, 128, 0.25)
    query = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    starts = torch.arange(5, dtype=torch.int32, device="cuda")
    kwargs = dict(max_query_len=1, max_seq_len=max(context_lens), k_scale=0.5, v_scale=0.25)
    eager = cuda_ops.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, starts, 0.1, **kwargs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cuda_ops.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, starts, 0.1, **kwargs)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)


@needs_fp8
@pytest.mark.parametrize("tokens", [3, 7, 64, 300])
def test_fp8_linear_on_tensor_cores_matches_its_reference(tokens: int) -> None:
    # From 3 tokens on: fewer take the weight-only GEMV (tests/kernels/test_cuda_gemv.py).
    torch.manual_seed(tokens)
    layer = Fp8Linear(512, 768, bias=True).cuda()
    weight, scale = quantize_rows(torch.randn(768, 512, device="cuda"))
    layer.weight.data, layer.weight_scale.data = weight, scale
    layer.bias.data = torch.randn(768, device="cuda").to(torch.bfloat16)
    x = torch.randn(tokens, 512, device="cuda").to(torch.bfloat16)
    actual = layer(x)
    expected = fp8_linear_reference(x.float(), weight, scale, layer.bias.float())
    assert actual.dtype == torch.bfloat16
    # Both take the same FP8 operands; they differ by accumulation order and the bf16 output.
    assert (actual.float() - expected).norm() / expected.norm() < 1e-2


def test_fp8_cache_is_refused_with_float32_rows() -> None:
    key = torch.randn(2, 8, 64, device="cuda")
    cache = torch.zeros(4, 16, 8, 64, dtype=FP8, device="cuda")
    with pytest.raises(ValueError, match="bf16 or fp16"):
        cuda_ops.reshape_and_cache(key, key, cache, cache.clone(), torch.tensor([0, 1], device="cuda"))
