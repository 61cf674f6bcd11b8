"""The CUDA kernels equal their torch references (kernels/reference.py) over
random block tables, ragged prefill chunks and decodes, GQA ratios, head_dim
64 and 128, one and many context splits, sliding windows, and inside a
captured CUDA graph."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch

from pagewire.kernels import cuda_ops, reference

pytestmark = pytest.mark.gpu

# (query heads, KV heads): decodes of groups up to 8 take the transposed 8-row
# tile (8 fills it), of 16 a row group of 16.
HEAD_LAYOUTS = [(32, 8), (9, 3), (32, 32), (64, 8), (32, 2)]


@dataclass
class PagedBatch:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor

    def attention_args(self) -> tuple[torch.Tensor, ...]:
        return (self.query, self.key_cache, self.value_cache, self.block_tables, self.seq_lens, self.query_start_loc)


def make_batch(
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    seed: int = 0,
) -> PagedBatch:
    """Caches full of random values (unused slots too, so unmasked reads show),
    each sequence's blocks scattered at random, block table rows padded with
    random block ids past the context."""
    torch.manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 5
    max_blocks = max(blocks_per_seq) + 2
    block_tables = torch.randint(0, num_blocks, (len(context_lens), max_blocks), dtype=torch.int32)
    shuffled = torch.randperm(num_blocks, dtype=torch.int32)
    used = 0
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = shuffled[used : used + count]
        used += count
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return PagedBatch(
        query=torch.randn(sum(query_lens), num_heads, head_dim, device="cuda").to(dtype),
        key_cache=torch.randn(cache_shape, device="cuda").to(dtype),
        value_cache=torch.randn(cache_shape, device="cuda").to(dtype),
        block_tables=block_tables.cuda(),
        seq_lens=torch.tensor(context_lens, dtype=torch.int32, device="cuda"),
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda"),
    )


def reference_attention(batch: PagedBatch, scale: float, sliding_window: int = 0) -> torch.Tensor:
    """The reference on float32 copies of the same inputs."""
    return reference.paged_attention(
        batch.query.float(), batch.key_cache.float(), batch.value_cache.float(),
        batch.block_tables, batch.seq_lens, batch.query_start_loc, scale, sliding_window=sliding_window,
    )  # fmt: skip


def assert_attention_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.isfinite(actual).all()
    relative_error = (actual.float() - expected).norm() / expected.norm()
    assert relative_error < 1e-2, f"relative error {relative_error:.2e}"
    torch.testing.assert_close(actual.float(), expected, atol=3e-2, rtol=3e-2)


BATCHES = {
    # decodes at ragged lengths: one token, block edges, long enough to split
    "decode": ([1] * 6, [1, 16, 17, 300, 1000, 2053]),
    # a whole prompt, chunks after earlier context, decodes and an empty padding sequence
    "mixed": ([1, 37, 1, 128, 5, 0, 64], [50, 37, 700, 400, 5, 0, 1100]),
}


@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_LAYOUTS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_paged_attention_matches_reference(kind: str, head_dim: int, num_heads: int, num_kv_heads: int) -> None:
    query_lens, context_lens = BATCHES[kind]
    batch = make_batch(query_lens, context_lens, num_heads, num_kv_heads, head_dim, torch.bfloat16)
    scale = head_dim**-0.5
    assert_attention_close(cuda_ops.paged_attention(*batch.attention_args(), scale), reference_attention(batch, scale))


@pytest.mark.parametrize("num_splits", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("chunk", [20, 2])
def test_paged_attention_any_split_count(
    chunk: int, num_splits: int, dtype: torch.dtype, block_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The split count is a tuning choice: every count gives the same answer,
    also where a split gets no context at all; with a 2-token chunk beside
    the decodes, every tile is a transposed one of two tokens."""
    monkeypatch.setattr(cuda_ops, "choose_num_splits", lambda *args: num_splits)
    batch = make_batch([1, 1, chunk, 1], [3, 900, 260, 4099], 32, 8, 128, dtype, block_size=block_size, seed=num_splits)
    scale = 0.1
    assert_attention_close(cuda_ops.paged_attention(*batch.attention_args(), scale), reference_attention(batch, scale))


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("sliding_window", [1, 40, 300])
@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_paged_attention_sliding_window(kind: str, sliding_window: int, num_splits: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each query sees only the last sliding_window keys, in decodes and in
    prefill chunks (whose rows' windows start at different keys), with the
    kernel's own split count and forced ones. Blocks wholly before every
    window go back to the engine's pool and may hold anything; here they
    point at a block of NaNs, which would show if read."""
    if num_splits is not None:
        monkeypatch.setattr(cuda_ops, "choose_num_splits", lambda *args: num_splits)
    query_lens, context_lens = BATCHES[kind]
    block_size = 16
    batch = make_batch(query_lens, context_lens, 32, 8, 128, torch.bfloat16, block_size=block_size)
    scale = 0.1
    expected = reference_attention(batch, scale, sliding_window)
    live = {int(b) for seq, n in enumerate(context_lens) for b in batch.block_tables[seq, : math.ceil(n / block_size)]}
    poisoned = next(b for b in range(batch.key_cache.shape[0]) if b not in live)
    batch.key_cache[poisoned] = float("nan")
    batch.value_cache[poisoned] = float("nan")
    for seq, (query_len, context_len) in enumerate(zip(query_lens, context_lens)):
        slid = max(0, context_len - query_len - sliding_window + 1) // block_size
        batch.block_tables[seq, :slid] = poisoned
    assert_attention_close(cuda_ops.paged_attention(*batch.attention_args(), scale, sliding_window=sliding_window), expected)


def test_decode_kernels_fit_the_device_as_measured() -> None:
    """The split rule counts resident blocks with the occupancy calculator:
    registers, not only shared memory, limit the decode layout."""
    device = torch.device("cuda")
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    for head_dim, tile_rows in itertools.product(cuda_ops.SUPPORTED_HEAD_DIMS, (8, 16)):
        kernel = cuda_ops.attention_kernel(torch.bfloat16, head_dim, tile_rows, device)
        assert multiprocessors <= kernel.resident_blocks <= multiprocessors * 2048 // cuda_ops.THREADS
        by_shared = torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor // kernel.shared_bytes
        assert kernel.resident_blocks <= multiprocessors * by_shared


@pytest.mark.parametrize("head_dim", [64, 128])
def test_fewer_blocks_per_multiprocessor_give_the_same_answer(head_dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The occupancy is a tuning choice made by padding the launch's shared
    memory: it limits the resident blocks and leaves the output alone, in
    any order of launches (the kernel's shared memory limit only rises: a
    launch asking for less must not lower it under one asking for more)."""
    device = torch.device("cuda")
    batch = make_batch([1] * 40, [37 * seq + 5 for seq in range(40)], 32, 8, head_dim, torch.bfloat16)
    scale = 0.1
    expected = reference_attention(batch, scale)
    for blocks_per_multiprocessor in (1, 2, 1):
        kernel = cuda_ops.attention_kernel(torch.bfloat16, head_dim, cuda_ops.choose_tile_rows(1, 4), device, blocks_per_multiprocessor=blocks_per_multiprocessor)
        assert kernel.blocks_per_multiprocessor == blocks_per_multiprocessor
        monkeypatch.setattr(cuda_ops, "choose_blocks_per_multiprocessor", lambda *args, chosen=blocks_per_multiprocessor: chosen)
        assert_attention_close(cuda_ops.paged_attention(*batch.attention_args(), scale), expected)


def test_paged_attention_accepts_a_strided_query_view() -> None:
    """The engine hands in q as a view of the fused qkv projection."""
    batch = make_batch([3, 1], [40, 77], 32, 8, 64, torch.bfloat16)
    fused = torch.randn(4, 48 * 64, device="cuda", dtype=torch.bfloat16)
    batch.query = fused[:, : 32 * 64].view(4, 32, 64)
    scale = 0.125
    assert_attention_close(cuda_ops.paged_attention(*batch.attention_args(), scale), reference_attention(batch, scale))


@pytest.mark.parametrize("num_kv_heads,head_dim", [(8, 128), (3, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reshape_and_cache_matches_reference(num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    num_tokens, num_blocks, block_size = 40, 12, 16
    # key and value as views of a fused projection, as the model produces them
    fused = torch.randn(num_tokens, (4 + 2) * num_kv_heads * head_dim, device="cuda").to(dtype)
    key = fused[:, 4 * num_kv_heads * head_dim : 5 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = fused[:, 5 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[::7] = -1  # padding rows
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda").to(dtype) for _ in range(2)]
    expected = [cache.clone() for cache in caches]
    cuda_ops.reshape_and_cache(key, value, *caches, slots)
    reference.reshape_and_cache(key, value, *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_kernels_replay_inside_a_cuda_graph() -> None:
    """Captured once with static buffers, replayed on new contents, the
    kernels give the reference's answer: what the engine's decode graphs need."""
    num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len = 4, 32, 8, 128, 2048
    batch = make_batch([1] * num_seqs, [max_seq_len] * num_seqs, num_heads, num_kv_heads, head_dim, torch.bfloat16)
    new_key = torch.empty(num_seqs, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    new_value = torch.empty_like(new_key)
    slot_mapping = torch.empty(num_seqs, dtype=torch.int64, device="cuda")
    scale = head_dim**-0.5

    def step() -> torch.Tensor:
        cuda_ops.reshape_and_cache(new_key, new_value, batch.key_cache, batch.value_cache, slot_mapping)
        return cuda_ops.paged_attention(*batch.attention_args(), scale, max_query_len=1, max_seq_len=max_seq_len)

    def fill(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, max_seq_len + 1, (num_seqs,), generator=generator)
        batch.seq_lens.copy_(lengths)
        positions = (lengths - 1).tolist()
        slots = [int(batch.block_tables[s, p // 16]) * 16 + p % 16 for s, p in enumerate(positions)]
        slot_mapping.copy_(torch.tensor(slots))
        for tensor in (new_key, new_value, batch.query):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        return slots

    fill(0)
    step()  # compiles and loads the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()
    for seed in (1, 2):
        fill(seed)
        expected_key, expected_value = batch.key_cache.clone(), batch.value_cache.clone()
        reference.reshape_and_cache(new_key, new_value, expected_key, expected_value, slot_mapping)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(batch.key_cache, expected_key) and torch.equal(batch.value_cache, expected_value)
        assert_attention_close(graph_out, reference_attention(batch, scale))
