"""Batched LoRA on a projection: every token of a flattened batch may use
another adapter (or none), and all of them go through the same two GEMMs.

Each adapter sits in one of a fixed number of device slots, padded with
zeros to the largest rank, so every shape is static and a decode step with
any mix of adapters replays the same CUDA graph. For a token x whose adapter
is in slot s the projection adds B[s] @ (A[s] @ x), the adapter's scale
folded into B. Instead of gathering each token's matrices (a copy of A and B
per token), x is multiplied by the A of every slot at once (the slots' ranks
side by side: a few hundred extra output columns), the columns of the other
slots are masked to zero, and the result is multiplied by the B of every
slot: the masked columns add nothing. A fused projection (q/k/v, gate/up)
gives each part its own rank-wide column group, so B is block diagonal and
each part's adapter lands in its slice of the output."""

from __future__ import annotations

import torch
from torch import nn


class LoraContext:
    """The adapter slot of every token of the current forward pass, shared by
    all the LoRA projections of a model; the runner binds it before each
    forward (inside a decode graph, from the graph's static slot buffer)."""

    def __init__(self, num_slots: int, dtype: torch.dtype, device: torch.device):
        self.num_slots = num_slots
        self.dtype = dtype
        self._slot_ids = torch.arange(num_slots, device=device)
        # [tokens, slots, 1]: 1 where the token's adapter sits in the slot. None: no adapters bound.
        self.mask: torch.Tensor | None = None

    def bind(self, token_slots: torch.Tensor | None) -> None:
        """token_slots [tokens] int64: each token's slot, -1 for the base model;
        None when no token has an adapter (the projections then skip LoRA).
        A comparison rather than one_hot, which checks its input on the host
        and so cannot be captured in a graph."""
        self.mask = None if token_slots is None else (token_slots[:, None] == self._slot_ids[None, :]).to(self.dtype).unsqueeze(-1)


class LoraLinear(nn.Module):
    """A projection (any linear() module) plus the adapters of every slot.
    `lora_a` [slots, parts * max_rank, in] and `lora_b` [out, slots, parts *
    max_rank]: part p of a fused projection uses rank columns p * max_rank
    onwards, and only its own output rows."""

    def __init__(self, base: nn.Module, input_size: int, part_sizes: list[int], max_rank: int, context: LoraContext, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.input_size = input_size
        self.part_sizes = part_sizes
        self.max_rank = max_rank
        self.context = context
        width = len(part_sizes) * max_rank
        self.register_buffer("lora_a", torch.zeros(context.num_slots, width, input_size, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(sum(part_sizes), context.num_slots, width, dtype=dtype, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        mask = self.context.mask
        if mask is None:
            return out
        num_tokens, slots = x.shape[0], self.context.num_slots
        shrunk = (x @ self.lora_a.view(-1, self.input_size).t()).view(num_tokens, slots, -1) * mask
        return out + shrunk.view(num_tokens, -1) @ self.lora_b.view(out.shape[-1], -1).t()

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[:, slot].zero_()

    def set_part(self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a [rank, in] and b [part's rows, rank] (scale folded in) into slot's part."""
        rank = a.shape[0]
        columns = slice(part * self.max_rank, part * self.max_rank + rank)
        rows = slice(sum(self.part_sizes[:part]), sum(self.part_sizes[: part + 1]))
        self.lora_a[slot, columns].copy_(a, non_blocking=True)
        self.lora_b[rows, slot, columns].copy_(b, non_blocking=True)
