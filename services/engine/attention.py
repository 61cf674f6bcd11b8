"""The attention backend interface: the model calls exactly two functions per
layer, with the metadata the runner prepares once per step.

  reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
  paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale)

kernels/reference.py defines both (and the cache layout); a device backend
provides the same two signatures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import reference


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    reshape_and_cache: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    paged_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each sequence attends to."""

    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 marks padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32


TORCH_REFERENCE = AttentionBackend("torch-reference", reference.reshape_and_cache, reference.paged_attention)


def select_backend(device: torch.device) -> AttentionBackend:
    """The attention implementation for a device."""
    return TORCH_REFERENCE
