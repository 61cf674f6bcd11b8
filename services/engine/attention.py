"""The attention backend interface: the model calls exactly two functions per
layer, with the metadata the runner prepares once per step.

  reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
  paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                  *, max_query_len=None, max_seq_len=None)

kernels/reference.py defines both (and the cache layout); a device backend
provides the same two signatures. The two keyword hints are the step's
longest query chunk and context, known on the host: the CUDA kernels size
their launch from them instead of reading the device (a sync, and not
allowed inside a CUDA graph capture)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import cuda_ops, reference


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    reshape_and_cache: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    paged_attention: Callable[..., torch.Tensor]  # reference.paged_attention's signature


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each sequence attends to."""

    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 marks padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int | None = None  # host-side hints for device backends; None: read them off the tensors
    max_seq_len: int | None = None


TORCH_REFERENCE = AttentionBackend("torch-reference", reference.reshape_and_cache, reference.paged_attention)
CUDA_KERNELS = AttentionBackend("cuda-kernels", cuda_ops.reshape_and_cache, cuda_ops.paged_attention)


def select_backend(device: torch.device) -> AttentionBackend:
    """The attention implementation for a device."""
    return CUDA_KERNELS if device.type == "cuda" else TORCH_REFERENCE
