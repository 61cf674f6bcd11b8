"""kernels/token_bitmask.cu on torch tensors: a grammar's token bitmask
applied to float32 logits on the GPU, in place, in one launch
(services/engine/executor/grammar.py: apply_token_bitmask is the torch
reference and the CPU path)."""

from __future__ import annotations

import numpy as np
import torch

from pagewire.kernels import loader

SOURCE = "token_bitmask.cu"
KERNEL = "apply_token_bitmask_kernel"
THREADS = 256  # BITMASK_THREADS in the source
TOKENS_PER_BLOCK = THREADS * 32  # BITMASK_TOKENS


def kernel_names() -> list[str]:
    return [KERNEL]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, logits_rows: torch.Tensor | None) -> None:
    """Mask logits [rows, vocab] float32 (last dimension contiguous) in place
    by bitmask [n, words] int32: mask row i applies to logits row
    logits_rows[i] (int64, on the logits' device), or to row i when None."""
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError(f"the bitmask kernel takes float32 logits whose last dimension is contiguous, got {logits.dtype}")
    bitmask = bitmask.contiguous()
    if logits_rows is not None:
        logits_rows = logits_rows.contiguous()
    if bitmask.dtype != torch.int32 or (logits_rows is not None and (logits_rows.dtype != torch.int64 or len(logits_rows) != len(bitmask))):
        raise ValueError("the bitmask kernel takes an int32 bitmask and one int64 logits row per mask row")
    if logits_rows is None and len(bitmask) > logits.shape[0]:
        raise ValueError(f"{len(bitmask)} mask rows for {logits.shape[0]} logits rows")
    if not len(bitmask):
        return
    vocab_size = logits.shape[-1]
    loader.launch(
        loader.get_kernel(SOURCE, KERNEL),
        logits.device,
        (len(bitmask), -(-vocab_size // TOKENS_PER_BLOCK)),
        (THREADS,),
        (
            np.uint64(logits.data_ptr()), np.uint64(bitmask.data_ptr()), np.uint64(0 if logits_rows is None else logits_rows.data_ptr()),
            np.int32(vocab_size), np.int32(bitmask.shape[1]), np.int64(logits.stride(0)),
        ),
    )  # fmt: skip
