"""The CUDA implementations of kernels/reference.py's two operations, with the
same signatures and semantics, so the engine can swap backends.

`paged_attention` takes two optional hints beyond the reference's arguments:
max_query_len and max_seq_len. Without them it reads both off the device (a
host sync); the engine passes them, and a CUDA graph capture must, since the
launch shape (warp layout, number of context splits) is fixed from them."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pagewire.kernels import loader

ATTENTION_SOURCE = "paged_attention.cu"
CACHE_SOURCE = "reshape_and_cache.cu"
CACHE_KERNEL = "reshape_and_cache_kernel"
FP8_CACHE_DTYPE = torch.float8_e4m3fn

SUPPORTED_HEAD_DIMS = (64, 128)
KERNEL_TYPES = {torch.bfloat16: "Bf16", torch.float16: "Fp16"}
# Query rows (packed tokens x heads of a KV group) per thread block of 4 warps:
# 8 computes transposed (paged_attention.cu), the others in 1, 2 or 4 warp rows of 16.
TILE_ROWS_CHOICES = (8, 16, 32, 64)
THREADS = 128
KV_TILE = 64
# K/V tiles in the cp.async ring of a thread block: two, and three for decodes
# (one warp row, tile_rows <= 16) whose K/V rows are at most NARROW_ROW_BYTES (an FP8 cache, or
# head_dim 64). Measured on an H200 (docs/PERFORMANCE.md): the third stage
# paid for narrow-row decodes (FP8 64 x 4096: 168.6 -> 161.3 us; head_dim 64
# at 256 x 512: 36.0 -> 34.6 and 80.3 -> 78.7 us) and for nothing else, where
# it costs a 16-bit ring of head_dim 128 a resident block.
PIPELINE_STAGES = 2
NARROW_ROW_DECODE_STAGES = 3
NARROW_ROW_BYTES = 128
# A context is split across thread blocks (flash-decoding) to fill one wave
# of resident blocks, in pieces of at least MIN_SPLIT_TOKENS; and where the
# (sequence, KV head) pairs are fewer than the multiprocessors, further, to
# one block per multiprocessor in pieces down to one K/V tile. Both measured
# on an H200 (docs/PERFORMANCE.md, split sweeps): a second wave of shorter
# blocks, with their fixed costs and the combine pass, never paid for itself;
# at batch 1 x 512, eight pieces of 64 tokens took 8.7 us where two of 256
# took 10.2.
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64
# More blocks than one wave: a short last wave leaves most multiprocessors
# idle while it runs, so fewer blocks per multiprocessor (shared memory padded
# at launch) are chosen where they fill the waves evenly: at least
# MIN_FILL_GAIN more of the waves' slots. From EVEN_WAVES_FROM waves on, the
# scheduler's backfill hides the last wave and the most blocks win. Both from
# the occupancy sweep on an H200 (docs/PERFORMANCE.md).
EVEN_WAVES_FROM = 4
MIN_FILL_GAIN = 0.05


def pipeline_stages(head_dim: int, tile_rows: int, fp8_cache: bool = False) -> int:
    """K/V tiles in flight in one block's cp.async ring."""
    row_bytes = head_dim * (1 if fp8_cache else 2)
    return NARROW_ROW_DECODE_STAGES if tile_rows <= 16 and row_bytes <= NARROW_ROW_BYTES else PIPELINE_STAGES


def attention_kernel_name(dtype: torch.dtype, head_dim: int, tile_rows: int, fp8_cache: bool = False) -> str:
    stages = pipeline_stages(head_dim, tile_rows, fp8_cache)
    return f"paged_attention_kernel<{KERNEL_TYPES[dtype]}, {head_dim}, {tile_rows}, {stages}, {'true' if fp8_cache else 'false'}>"


def fp8_cache_kernel_name(dtype: torch.dtype) -> str:
    return f"reshape_and_cache_fp8_kernel<{KERNEL_TYPES[dtype]}>"


def combine_kernel_name(dtype: torch.dtype, head_dim: int) -> str:
    return f"combine_splits_kernel<{KERNEL_TYPES[dtype]}, {head_dim}>"


def all_kernel_names() -> dict[str, list[str]]:
    """Every kernel instantiation these operations can launch, per source file."""
    attention = [
        name
        for dtype in KERNEL_TYPES
        for head_dim in SUPPORTED_HEAD_DIMS
        for name in (
            *(attention_kernel_name(dtype, head_dim, rows, fp8) for rows in TILE_ROWS_CHOICES for fp8 in (False, True)),
            combine_kernel_name(dtype, head_dim),
        )
    ]
    return {ATTENTION_SOURCE: attention, CACHE_SOURCE: [CACHE_KERNEL, *(fp8_cache_kernel_name(dtype) for dtype in KERNEL_TYPES)]}


@functools.cache
def _has_fp8_conversions(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def _check_fp8_cache(cache: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `cache` is FP8; raises where the kernels cannot read it."""
    if cache.dtype != FP8_CACHE_DTYPE:
        return False
    if dtype not in KERNEL_TYPES:
        raise ValueError(f"an FP8 KV cache takes bf16 or fp16 keys and values, got {dtype}")
    if not _has_fp8_conversions(cache.get_device()):
        raise ValueError("an FP8 KV cache needs a GPU of compute capability 8.9 or newer (E4M3 conversions)")
    return True


def attention_shared_bytes(head_dim: int, tile_rows: int, fp8_cache: bool = False) -> int:
    """Dynamic shared memory of one attention block; mirrors AttentionShape in
    paged_attention.cu: the ring of K+V stages of padded rows (E4M3 rows for
    an FP8 cache), reused by the epilogue."""
    warps_n = 4 // max(1, tile_rows // 16)
    staged_tile = 2 * KV_TILE * ((head_dim + 16) if fp8_cache else (head_dim + 8) * 2)
    pipeline = pipeline_stages(head_dim, tile_rows, fp8_cache) * staged_tile
    epilogue = warps_n * tile_rows * (head_dim + 2) * 4
    return max(pipeline, epilogue)


def _pointer(tensor: torch.Tensor) -> np.uint64:
    return np.uint64(tensor.data_ptr())


def _rows_in_16_byte_pieces(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` [num_tokens, ...] with each token's row contiguous and every row
    starting on a 16-byte boundary (a copy only when it is not already so)."""
    row_elements = math.prod(tensor.shape[1:])
    aligned = (
        tensor.stride(0) * tensor.element_size() % 16 == 0
        and tensor.data_ptr() % 16 == 0
        and tensor[0].is_contiguous()
        and row_elements * tensor.element_size() % 16 == 0
    )
    return tensor if aligned else tensor.contiguous()


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """kernels/reference.py: reshape_and_cache, on the GPU. A 16-bit cache
    takes the rows as they are (k_scale/v_scale unused); an FP8 one bf16/fp16
    rows divided by the scales."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    fp8 = _check_fp8_cache(key_cache, key.dtype)
    # The FP8 kernel converts 8 elements at a time (16 bytes in, 8 out).
    row_bytes = key_cache.shape[2] * key_cache.shape[3] * (2 if fp8 else key_cache.element_size())
    if row_bytes % 16:
        raise ValueError(f"a cache slot of {row_bytes} bytes is not a multiple of 16")
    key = _rows_in_16_byte_pieces(key if fp8 else key.to(key_cache.dtype))
    value = _rows_in_16_byte_pieces(value.to(key.dtype))
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    row_pieces = row_bytes // 16
    piece_elements = 16 // key.element_size()
    args = (
        _pointer(key),
        _pointer(value),
        _pointer(key_cache),
        _pointer(value_cache),
        _pointer(slot_mapping),
        np.int64(key.stride(0) // piece_elements),
        np.int64(value.stride(0) // piece_elements),
        np.int32(row_pieces),
    )
    kernel = loader.get_kernel(CACHE_SOURCE, fp8_cache_kernel_name(key.dtype) if fp8 else CACHE_KERNEL)
    scales = (np.float32(k_scale), np.float32(v_scale)) if fp8 else ()
    loader.launch(kernel, key.device, (num_tokens,), (min(THREADS, row_pieces),), (*args, *scales))


def choose_tile_rows(max_query_len: int, group: int) -> int:
    """Fewest query rows per block that hold a tile of the longest chunk:
    decodes get one row group (transposed up to 8 rows) with 4 warps
    splitting the K/V tokens, long prefill chunks 4 row groups."""
    rows = max_query_len * group
    return next((choice for choice in TILE_ROWS_CHOICES if rows <= choice), TILE_ROWS_CHOICES[-1])


def choose_num_splits(busy_blocks: int, max_seq_len: int, resident_blocks: int, multiprocessors: int) -> int:
    """How many thread blocks share one sequence's context (flash-decoding),
    given busy_blocks (sequence, KV head) pairs and the blocks that run at
    once on the device: as many as fill one wave, or as many as give each
    multiprocessor a block where that is more. max_seq_len is a bound (a CUDA
    graph is captured for the longest context; the kernel never cuts a piece
    shorter than a K/V tile), so no count depends on it beyond the shortest
    piece."""
    busy = max(1, busy_blocks)
    filling_the_wave = min(resident_blocks // busy, max_seq_len // MIN_SPLIT_TOKENS)
    one_per_multiprocessor = min(multiprocessors // busy, max_seq_len // KV_TILE)
    return max(1, min(max(filling_the_wave, one_per_multiprocessor), MAX_SPLITS))


def choose_blocks_per_multiprocessor(busy_blocks: int, multiprocessors: int, most: int) -> int:
    """How many of busy_blocks thread blocks share a multiprocessor, at most
    `most` (what registers and shared memory allow): the most, unless the
    blocks take between one and EVEN_WAVES_FROM waves and fewer per
    multiprocessor fill those waves' slots by MIN_FILL_GAIN more."""

    def fill(per_multiprocessor: int) -> float:
        waves = busy_blocks / (per_multiprocessor * multiprocessors)
        return waves / math.ceil(waves)

    if not most * multiprocessors < busy_blocks < EVEN_WAVES_FROM * most * multiprocessors:
        return most
    fewer = max(range(most - 1, 0, -1), key=fill, default=most)  # the first best: the most blocks
    return fewer if fill(fewer) >= fill(most) + MIN_FILL_GAIN else most


@dataclass(frozen=True)
class AttentionKernel:
    """The attention kernel of one launch shape and how it fits the device."""

    kernel: Any
    shared_bytes: int
    resident_blocks: int  # blocks that run at once on the device
    multiprocessors: int

    @property
    def blocks_per_multiprocessor(self) -> int:
        return self.resident_blocks // self.multiprocessors


def attention_kernel(
    dtype: torch.dtype, head_dim: int, tile_rows: int, device: torch.device, fp8_cache: bool = False, blocks_per_multiprocessor: int = 0
) -> AttentionKernel:
    """The kernel and its launch's shared memory: what the pipeline needs,
    or more where blocks_per_multiprocessor limits how many share one."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    shared_bytes = attention_shared_bytes(head_dim, tile_rows, fp8_cache)
    if blocks_per_multiprocessor:
        shared_bytes = max(shared_bytes, loader.shared_bytes_limiting_residency(blocks_per_multiprocessor, index))
    kernel = loader.get_kernel(ATTENTION_SOURCE, attention_kernel_name(dtype, head_dim, tile_rows, fp8_cache), shared_bytes)
    resident = loader.resident_blocks(kernel, THREADS, shared_bytes, index)
    return AttentionKernel(kernel, shared_bytes, resident, loader.multiprocessor_count(index))


def plan_attention(
    dtype: torch.dtype, head_dim: int, tile_rows: int, device: torch.device, fp8_cache: bool, busy_blocks: int, streamed_tokens: int
) -> tuple[AttentionKernel, int]:
    """The kernel (with its occupancy) and the number of context splits for
    busy_blocks (query tile, KV head) pairs that stream at most
    streamed_tokens of K/V each."""
    natural = attention_kernel(dtype, head_dim, tile_rows, device, fp8_cache)
    num_splits = choose_num_splits(busy_blocks, streamed_tokens, natural.resident_blocks, natural.multiprocessors)
    per_multiprocessor = choose_blocks_per_multiprocessor(
        busy_blocks * num_splits, natural.multiprocessors, natural.blocks_per_multiprocessor
    )
    if per_multiprocessor == natural.blocks_per_multiprocessor:
        return natural, num_splits
    return attention_kernel(dtype, head_dim, tile_rows, device, fp8_cache, per_multiprocessor), num_splits


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    sliding_window: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """kernels/reference.py: paged_attention, on the GPU, for bf16/fp16 and
    head_dim 64 or 128, over a cache of the query's dtype or FP8 (E4M3, read
    back times k_scale/v_scale). Query rows past query_start_loc[-1]
    (padding) come back unspecified."""
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    fp8 = _check_fp8_cache(key_cache, query.dtype)
    cache_dtype = FP8_CACHE_DTYPE if fp8 else query.dtype
    if query.dtype not in KERNEL_TYPES or key_cache.dtype != cache_dtype or value_cache.dtype != cache_dtype:
        raise ValueError(f"paged_attention needs a bf16 or fp16 query and a cache of its dtype or FP8, got {query.dtype}/{key_cache.dtype}")
    if head_dim not in SUPPORTED_HEAD_DIMS or cache_head_dim != head_dim:
        raise ValueError(f"head_dim {head_dim} (cache {cache_head_dim}) is not one of {SUPPORTED_HEAD_DIMS}")
    if num_heads % num_kv_heads or num_heads // num_kv_heads > TILE_ROWS_CHOICES[-1]:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    if block_size & (block_size - 1):
        raise ValueError(f"the cache's block size must be a power of two, got {block_size}")
    # Query fragments are read as pairs of elements.
    if query.stride(2) != 1 or query.stride(0) % 2 or query.stride(1) % 2 or query.data_ptr() % 4:
        query = query.contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    query_start_loc = query_start_loc.to(torch.int32).contiguous()

    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())

    group = num_heads // num_kv_heads
    tile_rows = choose_tile_rows(max_query_len, group)
    tile_tokens = tile_rows // group
    single_tile = max_query_len <= tile_tokens
    grid_tiles = num_seqs if single_tile else num_tokens // tile_tokens + num_seqs
    # A block streams at most the window (plus its own query rows) of K/V.
    streamed = min(max_seq_len, sliding_window + tile_tokens) if sliding_window > 0 else max_seq_len
    attention, num_splits = plan_attention(query.dtype, head_dim, tile_rows, query.device, fp8, grid_tiles * num_kv_heads, streamed)
    if num_splits > 1:
        partial_out = torch.empty(num_splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=query.device)
        partial_lse = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32, device=query.device)
    else:
        partial_out = partial_lse = out  # unused with one split

    loader.launch(
        attention.kernel,
        query.device,
        (grid_tiles * num_kv_heads, num_splits),
        (THREADS,),
        (
            _pointer(out),
            _pointer(partial_out),
            _pointer(partial_lse),
            _pointer(query),
            np.int64(query.stride(0)),
            np.int64(query.stride(1)),
            _pointer(key_cache),
            _pointer(value_cache),
            _pointer(block_tables),
            np.int32(block_tables.stride(0)),
            _pointer(seq_lens),
            _pointer(query_start_loc),
            np.int32(num_seqs),
            np.int32(num_tokens),
            np.int32(num_kv_heads),
            np.int32(group),
            np.int32(block_size.bit_length() - 1),
            np.int32(sliding_window),
            np.int32(single_tile),
            # An FP8 cache holds K / k_scale and V / v_scale: the scales go into the scores and the output.
            np.float32(scale * math.log2(math.e) * (k_scale if fp8 else 1.0)),
            np.float32(v_scale if fp8 else 1.0),
        ),
        attention.shared_bytes,
    )
    if num_splits > 1:
        loader.launch(
            loader.get_kernel(ATTENTION_SOURCE, combine_kernel_name(query.dtype, head_dim)),
            query.device,
            (num_tokens, num_heads),
            (head_dim // 2,),
            (_pointer(out), _pointer(partial_out), _pointer(partial_lse), np.int32(num_splits), np.int32(num_tokens)),
        )
    return out
