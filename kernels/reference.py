"""Torch reference implementations of the paged-attention kernels.

These are the definitions the CUDA kernels are tested against, and the
attention the engine uses on the CPU.

KV cache layout, per layer: key_cache and value_cache are
[num_blocks, block_size, num_kv_heads, head_dim]. A token's slot is
block_id * block_size + offset_in_block.

A step's batch is flattened: the query rows of sequence s are
query[query_start_loc[s]:query_start_loc[s + 1]], and they are the last
q_len_s tokens of its context of seq_lens[s] tokens (a prefill chunk when
q_len_s > 1, a decode when q_len_s == 1). Query row i of that chunk sits at
position seq_lens[s] - q_len_s + i and attends causally to positions 0..that
position, all read from the cache through block_tables[s]. With a sliding
window w (sliding_window > 0) it sees only positions position - w + 1 .. position,
as Mistral's attention does; blocks wholly before every query's window are
never read, so they may have been handed to other sequences.

An FP8 cache (float8_e4m3fn, --kv-cache-dtype fp8) holds key / k_scale and
value / v_scale, clamped to the e4m3 range (+-448); attention reads them back
as stored * scale. The scales are per tensor (one pair per layer); a 16/32-bit
cache ignores them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_CACHE_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_CACHE_DTYPE).max
# A row of zeros gets this scale instead of 0, so dividing by it stays finite.
MIN_SCALE = 1e-12


def to_cache_dtype(rows: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Rows as the cache stores them: divided by the scale and saturated for FP8, else cast."""
    if cache_dtype != FP8_CACHE_DTYPE:
        return rows.to(cache_dtype)
    return (rows.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)


def from_cache(rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Cached rows in float32, FP8 ones multiplied back by their scale."""
    return rows.float() * scale if rows.dtype == FP8_CACHE_DTYPE else rows.float()


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
    """Write key/value rows [num_tokens, num_kv_heads, head_dim] into the cache
    at slot_mapping [num_tokens] (int64); slot -1 marks a padding row to skip."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = to_cache_dtype(key[valid], key_cache.dtype, k_scale)
    value_cache[blocks, offsets] = to_cache_dtype(value[valid], value_cache.dtype, v_scale)


def visible_keys(query_positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int) -> torch.Tensor:
    """[..., queries, keys] mask of the keys each query attends to: causal, and
    within the last sliding_window positions when that is set (0: no window)."""
    distance = query_positions[..., :, None] - key_positions[..., None, :]
    visible = distance >= 0
    return visible & (distance < sliding_window) if sliding_window > 0 else visible


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first context_len cached rows of one sequence: [context_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    rows = cache[block_table[:num_blocks].long()].flatten(0, 1)
    return rows[:context_len]


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
    """Causal attention of a flattened mixed batch (prefill chunks and decodes)
    over the paged cache. query: [num_tokens, num_heads, head_dim]; returns the
    same shape. Grouped-query attention: num_heads is a multiple of num_kv_heads.
    max_query_len/max_seq_len are launch hints for device backends (see
    kernels/cuda_ops.py); the reference reads the lengths from the tensors."""
    num_heads = query.shape[1]
    group = num_heads // key_cache.shape[2]
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for s, context_len in enumerate(seq_lens.tolist()):
        q = query[starts[s] : starts[s + 1]]
        q_len = q.shape[0]
        if q_len == 0:
            continue
        k = from_cache(gather_context(key_cache, block_tables[s], context_len), k_scale).repeat_interleave(group, dim=1)
        v = from_cache(gather_context(value_cache, block_tables[s], context_len), v_scale).repeat_interleave(group, dim=1)
        query_pos = torch.arange(context_len - q_len, context_len, device=q.device)
        allowed = visible_keys(query_pos, torch.arange(context_len, device=q.device), sliding_window)
        attended = F.scaled_dot_product_attention(
            q.transpose(0, 1).float(), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, scale=scale
        )
        out[starts[s] : starts[s + 1]] = attended.transpose(0, 1).to(out.dtype)
    return out


def _slot_mask(token_slots: torch.Tensor, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[tokens, slots]: 1 where the token's adapter sits in the slot."""
    return (token_slots[:, None] == torch.arange(num_slots, device=token_slots.device)).to(dtype)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """kernels/lora.cu's shrink: x [tokens, in] times the A of each token's
    slot (token_slots [tokens], -1: no adapter, a row of zeros), lora_a
    [in, parts, slots, rank] -> [tokens, parts * rank] in x's dtype. Rather
    than copy each token's A, x is multiplied by every slot's A in one GEMM
    and the columns of the other slots are masked out."""
    input_size, num_parts, num_slots, rank = lora_a.shape
    every = (x @ lora_a.view(input_size, -1)).view(-1, num_parts, num_slots, rank)
    return (every * _slot_mask(token_slots, num_slots, x.dtype)[:, None, :, None]).sum(2).flatten(1)


def lora_expand(out: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, part_sizes: list[int]) -> torch.Tensor:
    """kernels/lora.cu's expand: out [tokens, sum(part_sizes)] plus, in place,
    for part p of a fused projection (its own output columns), shrunk's
    columns p * rank onwards times the B of the token's slot, lora_b
    [slots, rank, out] (the adapter's scale folded in). The shrunk row is
    spread over the slots' columns, masked, so each part takes one GEMM with
    every slot's B, accumulated into its columns of out. Returns out."""
    num_slots, rank, output_size = lora_b.shape
    mask = _slot_mask(token_slots, num_slots, lora_b.dtype)[:, None, :, None]
    spread = shrunk.view(-1, len(part_sizes), 1, rank).to(lora_b.dtype) * mask  # [tokens, parts, slots, rank]
    every_b = lora_b.view(num_slots * rank, output_size)
    start = 0
    for part, size in enumerate(part_sizes):
        out[:, start : start + size].addmm_(spread[:, part].flatten(1), every_b[:, start : start + size])
        start += size
    return out


def add_lora(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, part_sizes: list[int]
) -> torch.Tensor:
    """A projection's output out [tokens, sum(part_sizes)] plus, in place, the
    LoRA of each token's adapter slot on its input x: lora_expand of lora_shrink."""
    return lora_expand(out, lora_shrink(x, lora_a, token_slots), lora_b, token_slots, part_sizes)


def weight_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """kernels/gemv.cu with bf16 weights: x [m, k] times weight [n, k],
    accumulated in float32, rounded to x's dtype."""
    return (x.float() @ weight.float().t()).to(x.dtype)


def fp8_weight_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """kernels/gemv.cu with float8 weights: x [m, k] times weight [n, k] with
    one float32 scale per output row, accumulated in float32, rounded to x's dtype."""
    return (x.float() @ weight.float().t() * scale.float()).to(x.dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] as float8_e4m3fn and the float32 scale of each row [rows]:
    x ~= q * scale[:, None], with each row's largest magnitude at FP8_MAX.
    kernels/fp8_quant.cu computes the same bits on the GPU (where torch divides
    by the Python scalar FP8_MAX as a product with its float reciprocal)."""
    scale = (x.abs().amax(dim=-1).float() / FP8_MAX).clamp(min=MIN_SCALE)
    q = (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_CACHE_DTYPE)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)
