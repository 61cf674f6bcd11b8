"""The torch reference paged attention equals dense causal attention on the
same K/V laid out contiguously, for ragged prefill chunks and decodes, with
and without a sliding window."""

from __future__ import annotations

import pytest
import torch

from pagewire.kernels.reference import paged_attention, reshape_and_cache


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """q: [q_len, H, D] ending at the last of k's positions; k/v: [ctx, Hkv, D];
    each query sees the keys at most window - 1 positions back (0: all)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    ctx, q_len = k.shape[0], q.shape[0]
    distance = torch.arange(ctx - q_len, ctx)[:, None] - torch.arange(ctx)[None, :]
    mask = (distance < 0) | ((distance >= window) if window else False)
    scores.masked_fill_(mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention_matches_dense_causal_attention(window: int) -> None:
    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 6, 2, 16, 4, 64
    context_lens, query_lens = [7, 13, 1, 9], [7, 5, 1, 1]  # full prefill, chunk, decode, decode
    key_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    value_cache = torch.zeros_like(key_cache)
    free_blocks = torch.randperm(num_blocks).tolist()
    max_blocks = max((n + block_size - 1) // block_size for n in context_lens)
    block_tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    keys, values, queries = [], [], []
    for s, n in enumerate(context_lens):
        for b in range((n + block_size - 1) // block_size):
            block_tables[s, b] = free_blocks.pop()
        k, v = torch.randn(n, num_kv_heads, head_dim), torch.randn(n, num_kv_heads, head_dim)
        slots = torch.tensor([int(block_tables[s, p // block_size]) * block_size + p % block_size for p in range(n)])
        reshape_and_cache(k, v, key_cache, value_cache, slots)
        keys.append(k)
        values.append(v)
        queries.append(torch.randn(query_lens[s], num_heads, head_dim))
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    scale = head_dim**-0.5
    out = paged_attention(
        torch.cat(queries), key_cache, value_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32), query_start_loc, scale,
        sliding_window=window,
    )
    expected = torch.cat([_dense_attention(q, k, v, scale, window) for q, k, v in zip(queries, keys, values)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reshape_and_cache_skips_padding_slots() -> None:
    key_cache = torch.zeros(2, 4, 1, 2)
    value_cache = torch.zeros_like(key_cache)
    key = torch.ones(3, 1, 2)
    reshape_and_cache(key, key * 2, key_cache, value_cache, torch.tensor([5, -1, 0]))
    assert key_cache[1, 1].sum() == 2 and key_cache[0, 0].sum() == 2
    assert key_cache.sum() == 4 and value_cache.sum() == 8
