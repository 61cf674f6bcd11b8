"""Paged attention on the CPU with the sequences of a step batched.

kernels/reference.py attends one sequence at a time, which on a CPU costs a
gather, a GQA expansion and an SDPA call per sequence and layer: most of a
decode step for a batch of 32. Here a group of sequences is gathered at once
from the block tables, padded to the longest query chunk and context, and
goes through one SDPA call with a causal mask and grouped-query heads. The
whole step is one group while its padded scores stay under a budget;
otherwise the decodes form one group and each prefill chunk its own, so a
long prompt never pads every decode out to its length. Same signature and
results as reference.paged_attention (up to float rounding).

The K/V of a group is copied out of the cache with index_select over whole
blocks (a memcpy per block row, where advanced indexing copies element by
element) into scratch buffers kept across calls, so the 30 layers of a step
reuse the same pages instead of faulting fresh ones in each time. Query
heads are grouped by the KV head they share, so SDPA reads each KV head once
without expanding it (for a decode that is a view of the query)."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from pagewire.kernels import reference

# Writing the cache is one indexed copy already.
reshape_and_cache = reference.reshape_and_cache

# Most padded attention scores (sequences x heads x query rows x context) in one call.
MAX_PADDED_SCORES = 1 << 25
# Largest scratch buffer kept between calls; a bigger gather gets a buffer of its own.
MAX_SCRATCH_BYTES = 64 << 20


class _Scratch(threading.local):
    """Flat buffers by role, one set per thread (engines in one process may share it)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of numel elements, free to overwrite until the next take of this role."""
        buffer = self.buffers.get(role)
        if buffer is not None and buffer.dtype == dtype and buffer.numel() >= numel:
            return buffer[:numel]
        # A normal tensor even when taken in inference mode: an inference
        # tensor could not be written later outside it.
        with torch.inference_mode(False):
            buffer = torch.empty(numel, dtype=dtype)
        if numel * buffer.element_size() <= MAX_SCRATCH_BYTES:
            self.buffers[role] = buffer
        return buffer


_scratch = _Scratch()


def _gather(cache: torch.Tensor, tables: torch.Tensor, scale: float, role: str) -> torch.Tensor:
    """The blocks of tables [seqs, blocks] as float32 [seqs, blocks * block_size, kv_heads, head_dim]."""
    num_seqs, num_blocks = tables.shape
    rows = cache.view(cache.shape[0], -1)
    copied = _scratch.take(role, tables.numel() * rows.shape[1], cache.dtype).view(tables.numel(), rows.shape[1])
    # A sliding window's table marks the blocks it dropped with -1: any block
    # will do there, since the mask hides those positions.
    torch.index_select(rows, 0, tables.flatten().clamp(min=0), out=copied)
    shape = (num_seqs, num_blocks * cache.shape[1], *cache.shape[2:])
    if cache.dtype == torch.float32:
        return copied.view(shape)
    widened = _scratch.take(role + "-float32", copied.numel(), torch.float32).view(copied.shape)
    widened.copy_(copied)
    if cache.dtype == reference.FP8_CACHE_DTYPE:
        widened.mul_(scale)
    return widened.view(shape)


def _padded_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    scale: float,
    sliding_window: int,
    k_scale: float,
    v_scale: float,
) -> None:
    """Attention of one group of sequences (all with query rows), written into out."""
    block_size = key_cache.shape[1]
    num_seqs, num_heads, head_dim = len(query_lens), query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    max_query_len = int(query_lens.max())
    num_blocks = (int(context_lens.max()) + block_size - 1) // block_size
    tables = block_tables[:, :num_blocks].long()
    # [seqs, kv_heads, context, head_dim] views of the float32 copies, as SDPA takes them.
    keys = _gather(key_cache, tables, k_scale, "key").transpose(1, 2)
    values = _gather(value_cache, tables, v_scale, "value").transpose(1, 2)
    offsets = torch.arange(max_query_len)
    valid = offsets[None, :] < query_lens[:, None]
    rows = (query_starts[:, None] + offsets[None, :])[valid]
    if max_query_len == 1:  # decodes: no padding rows
        queries = query[query_starts].float()
    else:
        queries = query.new_zeros(num_seqs, max_query_len, num_heads, head_dim, dtype=torch.float32)
        queries[valid] = query[rows].float()
    # Row i of a chunk sits at position context - chunk + i and sees positions up to it
    # (within the window, if any); padding rows are dropped, whatever they see.
    positions = (context_lens - query_lens)[:, None] + offsets[None, :]
    visible = reference.visible_keys(positions, torch.arange(keys.shape[2]), sliding_window)
    # The query heads of one KV head become that head's query rows, group-major:
    # [seqs, query rows, kv_heads, group, head_dim] -> [seqs, kv_heads, group * query rows, head_dim].
    group = num_heads // num_kv_heads
    grouped = queries.view(num_seqs, max_query_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    mask = visible[:, None, None].expand(num_seqs, 1, group, max_query_len, keys.shape[2])
    attended = F.scaled_dot_product_attention(
        grouped.reshape(num_seqs, num_kv_heads, group * max_query_len, head_dim), keys, values,
        attn_mask=mask.reshape(num_seqs, 1, group * max_query_len, keys.shape[2]), scale=scale,
    )  # fmt: skip
    attended = attended.view(num_seqs, num_kv_heads, group, max_query_len, head_dim).permute(0, 3, 1, 2, 4)
    out[rows] = attended.reshape(num_seqs, max_query_len, num_heads, head_dim)[valid].to(out.dtype)

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
    """kernels/reference.py: paged_attention, with the step's sequences batched."""
    out = torch.empty_like(query)
    query_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    active = (query_lens > 0).nonzero().squeeze(1)
    if len(active) == 0:
        return out
    padded_scores = len(active) * query.shape[1] * int(query_lens.max()) * int(seq_lens.max())
    if padded_scores <= MAX_PADDED_SCORES:
        groups = [active]
    else:
        groups = [(query_lens == 1).nonzero().squeeze(1)] + [s.view(1) for s in (query_lens > 1).nonzero()]
    for group in (g for g in groups if len(g)):
        _padded_attention(
            out, query, key_cache, value_cache, block_tables[group], seq_lens[group].long(),
            query_start_loc[group].long(), query_lens[group], scale, sliding_window, k_scale, v_scale,
        )  # fmt: skip
    return out
