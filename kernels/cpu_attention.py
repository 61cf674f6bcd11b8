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
reuse the same pages instead of faulting fresh ones in each time. Writing
the cache is one row copy per cache. Query
heads are grouped by the KV head they share, so SDPA reads each KV head once
without expanding it (for a decode that is a view of the query). What
depends only on the step's metadata (groups, tables, row indices, masks) is
planned at the first layer and reused by the others."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagewire.kernels import reference


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
    """kernels/reference.py: reshape_and_cache, as one row copy per cache
    where the cache holds the rows' own dtype and no slot is padding (the
    CPU runner's steps); the reference's masked writes otherwise."""
    if key_cache.dtype != key.dtype or bool((slot_mapping < 0).any()):
        reference.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
        return
    for rows, cache in ((key, key_cache), (value, value_cache)):
        cache.view(-1, cache[0, 0].numel()).index_copy_(0, slot_mapping, rows.reshape(len(rows), -1))

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


def _gather(cache: torch.Tensor, blocks: torch.Tensor, num_seqs: int, scale: float, role: str) -> torch.Tensor:
    """The blocks (num_seqs tables, flattened) as float32 [seqs, blocks * block_size, kv_heads, head_dim]."""
    rows = cache.view(cache.shape[0], -1)
    copied = _scratch.take(role, blocks.numel() * rows.shape[1], cache.dtype).view(blocks.numel(), rows.shape[1])
    torch.index_select(rows, 0, blocks, out=copied)
    shape = (num_seqs, blocks.numel() // num_seqs * cache.shape[1], *cache.shape[2:])
    if cache.dtype == torch.float32:
        return copied.view(shape)
    widened = _scratch.take(role + "-float32", copied.numel(), torch.float32).view(copied.shape)
    widened.copy_(copied)
    if cache.dtype == reference.FP8_CACHE_DTYPE:
        widened.mul_(scale)
    return widened.view(shape)


@dataclass(frozen=True)
class _GroupPlan:
    """What one group's attention needs of the step's metadata, which every
    layer shares: its tables, where its query rows sit, and its mask."""

    blocks: torch.Tensor  # [seqs * blocks] int64: the tables flattened
    query_starts: torch.Tensor  # [seqs] int64
    valid: torch.Tensor  # [seqs, max_query_len]: rows that are real, not padding
    rows: torch.Tensor  # the real rows' indices in the flattened query
    # [seqs, 1, group * max_query_len, context] float: 0 where a query row (heads of a KV head group-major) sees a key, -inf elsewhere
    mask: torch.Tensor
    every_row_decodes: bool  # the group is the whole step, one query row per sequence in order: no gather or scatter of rows


def _plan_group(
    block_tables: torch.Tensor, context_lens: torch.Tensor, query_starts: torch.Tensor, query_lens: torch.Tensor,
    block_size: int, group: int, sliding_window: int, num_tokens: int,
) -> _GroupPlan:  # fmt: skip
    num_seqs = len(query_lens)
    max_query_len = int(query_lens.max())
    num_blocks = (int(context_lens.max()) + block_size - 1) // block_size
    offsets = torch.arange(max_query_len)
    valid = offsets[None, :] < query_lens[:, None]
    rows = (query_starts[:, None] + offsets[None, :])[valid]
    # Row i of a chunk sits at position context - chunk + i and sees positions up to it
    # (within the window, if any); padding rows are dropped, whatever they see.
    positions = (context_lens - query_lens)[:, None] + offsets[None, :]
    context = num_blocks * block_size
    visible = reference.visible_keys(positions, torch.arange(context), sliding_window)
    visible = visible[:, None, None].expand(num_seqs, 1, group, max_query_len, context).reshape(num_seqs, 1, group * max_query_len, context)
    # SDPA turns a boolean mask into this on every call; the step's layers share one.
    mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
    # A sliding window's table marks the blocks it dropped with -1: any block
    # will do there, since the mask hides those positions.
    blocks = block_tables[:, :num_blocks].flatten().long().clamp(min=0)
    every_row_decodes = max_query_len == 1 and num_tokens == num_seqs
    return _GroupPlan(blocks, query_starts, valid, rows, mask, every_row_decodes)


def _plan(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor, num_heads: int, block_size: int, group: int,
    sliding_window: int,
) -> list[_GroupPlan]:  # fmt: skip
    query_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    num_tokens = int(query_start_loc[-1])
    active = (query_lens > 0).nonzero().squeeze(1)
    if len(active) == 0:
        return []
    padded_scores = len(active) * num_heads * int(query_lens.max()) * int(seq_lens.max())
    if padded_scores <= MAX_PADDED_SCORES:
        groups = [active]
    else:
        groups = [(query_lens == 1).nonzero().squeeze(1)] + [s.view(1) for s in (query_lens > 1).nonzero()]
    return [
        _plan_group(block_tables[g], seq_lens[g].long(), query_start_loc[g].long(), query_lens[g], block_size, group, sliding_window, num_tokens)
        for g in groups
        if len(g)
    ]


class _LastPlan(threading.local):
    """The plan of the last call, for the next layers of the same step, which
    pass the same metadata: kept with copies of the tensors it was made from
    and reused while they are equal (three small comparisons where planning
    takes a dozen operations)."""

    def __init__(self) -> None:
        self.tensors: tuple[torch.Tensor, ...] = ()
        self.settings: tuple[int, ...] = ()
        self.groups: list[_GroupPlan] = []

    def get(self, tensors: tuple[torch.Tensor, ...], settings: tuple[int, ...]) -> list[_GroupPlan] | None:
        if settings != self.settings or len(tensors) != len(self.tensors):
            return None
        for now, kept in zip(tensors, self.tensors):
            if now.shape != kept.shape or now.dtype != kept.dtype or not torch.equal(now, kept):
                return None
        return self.groups

    def keep(self, tensors: tuple[torch.Tensor, ...], settings: tuple[int, ...], groups: list[_GroupPlan]) -> None:
        self.tensors, self.settings, self.groups = tuple(t.clone() for t in tensors), settings, groups


_last_plan = _LastPlan()


def _attend(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, plan: _GroupPlan,
            scale: float, k_scale: float, v_scale: float) -> None:  # fmt: skip
    """Attention of one group of sequences (all with query rows), written into out."""
    num_seqs, max_query_len = plan.valid.shape
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    # [seqs, kv_heads, context, head_dim] views of the float32 copies, as SDPA takes them.
    keys = _gather(key_cache, plan.blocks, num_seqs, k_scale, "key").transpose(1, 2)
    values = _gather(value_cache, plan.blocks, num_seqs, v_scale, "value").transpose(1, 2)
    if plan.every_row_decodes:
        queries = query.float()
    elif max_query_len == 1:  # decodes: no padding rows
        queries = query[plan.query_starts].float()
    else:
        queries = query.new_zeros(num_seqs, max_query_len, num_heads, head_dim, dtype=torch.float32)
        queries[plan.valid] = query[plan.rows].float()
    # The query heads of one KV head become that head's query rows, group-major:
    # [seqs, query rows, kv_heads, group, head_dim] -> [seqs, kv_heads, group * query rows, head_dim].
    group = num_heads // num_kv_heads
    grouped = queries.view(num_seqs, max_query_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    attended = F.scaled_dot_product_attention(
        grouped.reshape(num_seqs, num_kv_heads, group * max_query_len, head_dim), keys, values, attn_mask=plan.mask, scale=scale
    )
    attended = attended.view(num_seqs, num_kv_heads, group, max_query_len, head_dim).permute(0, 3, 1, 2, 4)
    if plan.every_row_decodes:
        out.copy_(attended.reshape(num_seqs, num_heads, head_dim))
    else:
        out[plan.rows] = attended.reshape(num_seqs, max_query_len, num_heads, head_dim)[plan.valid].to(out.dtype)


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
    """kernels/reference.py: paged_attention, with the step's sequences batched.
    The groups, tables and masks are planned once per step (the first layer's
    call) and reused by the layers after it."""
    out = torch.empty_like(query)
    tensors = (block_tables, seq_lens, query_start_loc)
    settings = (query.shape[1], key_cache.shape[1], query.shape[1] // key_cache.shape[2], sliding_window)
    groups = _last_plan.get(tensors, settings)
    if groups is None:
        groups = _plan(*tensors, *settings)
        _last_plan.keep(tensors, settings, groups)
    for plan in groups:
        _attend(out, query, key_cache, value_cache, plan, scale, k_scale, v_scale)
    return out
