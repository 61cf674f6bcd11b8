"""The kernel backend: every operation of a decoder layer that is not a GEMM.
Attention is two functions, called with the metadata the runner prepares
once per step:

  reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
  paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                  *, max_query_len=None, max_seq_len=None)

kernels/reference.py defines both (and the cache layout); kernels/layer_ops.py
defines the rest (rms_norm, add_rms_norm, rotary_embedding, silu_and_mul).
A device backend provides the same signatures. The two keyword hints are the step's
longest query chunk and context, known on the host: the CUDA kernels size
their launch from them instead of reading the device (a sync, and not
allowed inside a CUDA graph capture)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from pagewire.kernels import cpu_attention, cpu_layer_ops, cuda_layer_ops, cuda_ops


@dataclass(frozen=True)
class KernelBackend:
    name: str
    reshape_and_cache: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    paged_attention: Callable[..., torch.Tensor]  # reference.paged_attention's signature
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    rotary_embedding: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # layer_ops.rotary_embedding's signature
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each sequence attends to."""

    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 marks padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int | None = None  # host-side hints for device backends; None: read them off the tensors
    max_seq_len: int | None = None


def _backend(name: str, attention: ModuleType, layer: ModuleType) -> KernelBackend:
    return KernelBackend(
        name, attention.reshape_and_cache, attention.paged_attention,
        layer.rms_norm, layer.add_rms_norm, layer.rotary_embedding, layer.silu_and_mul,
    )  # fmt: skip


# kernels/reference.py with the step's sequences attending in batched SDPA calls,
# and kernels/layer_ops.py in fewer operator calls.
CPU = _backend("cpu", cpu_attention, cpu_layer_ops)
CUDA_KERNELS = _backend("cuda-kernels", cuda_ops, cuda_layer_ops)


def select_backend(device: torch.device) -> KernelBackend:
    """The kernel implementations for a device."""
    return CUDA_KERNELS if device.type == "cuda" else CPU
