"""Logits of a loaded model over one long sequence, run through the paged KV
cache in prefill chunks, and the two measures the FP8 accuracy tests bound:
relative error of the logits and top-1 agreement with a reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagewire.services.engine.executor.backend import AttentionMetadata
from pagewire.services.engine.executor.kv_tensors import allocate_kv_tensors
from pagewire.services.engine.executor.loader import LoadedModel

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Agreement:
    relative_error: float  # ||logits - reference|| / ||reference|| over every position
    top1: float  # fraction of positions whose argmax equals the reference's
    positions: int


def sequence_logits(loaded: LoadedModel, tokens: list[int], kv_dtype: torch.dtype, chunk: int = 256) -> torch.Tensor:
    """float32 logits [len(tokens), vocab]: each chunk is written into a
    cache of kv_dtype and attends to all of the cache before it."""
    config, device = loaded.config, loaded.device
    num_blocks = -(-len(tokens) // BLOCK_SIZE)
    kv_caches = allocate_kv_tensors(config.num_layers, num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim, kv_dtype, device)
    block_tables = torch.arange(num_blocks, dtype=torch.int32, device=device)[None]
    ids = torch.tensor(tokens, dtype=torch.int64, device=device)
    logits = []
    with torch.inference_mode():
        for start in range(0, len(tokens), chunk):
            end = min(start + chunk, len(tokens))
            positions = torch.arange(start, end, device=device)
            metadata = AttentionMetadata(
                slot_mapping=positions,  # the block table is the identity, so a token's slot is its position
                block_tables=block_tables,
                seq_lens=torch.tensor([end], dtype=torch.int32, device=device),
                query_start_loc=torch.tensor([0, end - start], dtype=torch.int32, device=device),
                max_query_len=end - start,
                max_seq_len=end,
            )
            logits.append(loaded.model.compute_logits(loaded.model(ids[start:end], positions, kv_caches, metadata)))
    return torch.cat(logits)


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> Agreement:
    relative = (logits - reference).norm() / reference.norm()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    return Agreement(float(relative), float(top1), reference.shape[0])
