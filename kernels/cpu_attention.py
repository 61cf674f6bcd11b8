"""Paged attention on the CPU with the sequences of a step batched.

kernels/reference.py attends one sequence at a time, which on a CPU costs a
gather, a GQA expansion and an SDPA call per sequence and layer: most of a
decode step for a batch of 32. Here a group of sequences is gathered at once
from the block tables, padded to the longest query chunk and context, and
goes through one SDPA call with a causal mask and grouped-query heads. The
whole step is one group while its padded scores stay under a budget;
otherwise the decodes form one group and each prefill chunk its own, so a
long prompt never pads every decode out to its length. Same signature and
results as reference.paged_attention (up to float rounding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagewire.kernels import reference

# Writing the cache is one indexed copy already.
reshape_and_cache = reference.reshape_and_cache

# Most padded attention scores (sequences x heads x query rows x context) in one call.
MAX_PADDED_SCORES = 1 << 25


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
    max_query_len = int(query_lens.max())
    num_blocks = (int(context_lens.max()) + block_size - 1) // block_size
    tables = block_tables[:, :num_blocks].long()
    # [seqs, context, kv_heads, head_dim] -> heads first for SDPA; fp32 inside, as the reference.
    keys = reference.from_cache(key_cache[tables], k_scale).flatten(1, 2).transpose(1, 2)
    values = reference.from_cache(value_cache[tables], v_scale).flatten(1, 2).transpose(1, 2)
    offsets = torch.arange(max_query_len)
    valid = offsets[None, :] < query_lens[:, None]
    rows = (query_starts[:, None] + offsets[None, :])[valid]
    queries = query.new_zeros(len(query_lens), max_query_len, *query.shape[1:], dtype=torch.float32)
    queries[valid] = query[rows].float()
    # Row i of a chunk sits at position context - chunk + i and sees positions up to it
    # (within the window, if any); padding rows are dropped, whatever they see.
    positions = (context_lens - query_lens)[:, None] + offsets[None, :]
    visible = reference.visible_keys(positions, torch.arange(keys.shape[2]), sliding_window)
    attended = F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, attn_mask=visible[:, None], scale=scale, enable_gqa=True)
    out[rows] = attended.transpose(1, 2)[valid].to(out.dtype)


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
