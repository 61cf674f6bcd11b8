"""Batched LoRA on a projection: every token of a flattened batch may use
another adapter (or none), and all of them go through the same two steps:
shrink (x times the A of the token's slot) and expand (that times the B of
its slot, added to the projection's output).

Each adapter sits in one of a fixed number of device slots, padded with
zeros to the largest rank, so every shape is static and a decode step with
any mix of adapters replays the same CUDA graph. Two ways to run them:
dense (kernels/reference.py) multiplies every token by every slot's weights
in two tensor-core GEMMs and masks out the other slots' columns; gathered
(kernels/lora.cu, GPU only) reads each token's own slot on the CUDA cores.
Dense does slots times the work, but on tensor cores; while the slots'
columns (slots x rank) stay within DENSE_MAX_SLOT_COLUMNS that work is a few
per cent of the projection's own and dense is the faster (an H200 measured
it: docs/PERFORMANCE.md, LoRA). A fused projection (q/k/v, gate/up) gives each
part its own rank-wide group of A's columns and its own columns of B, so
each part's adapter lands in its slice of the output."""

from __future__ import annotations

import torch
from torch import nn

from pagewire.kernels import cuda_lora, reference

# --lora-kernel auto takes the dense GEMMs up to this many slot columns
# (--max-loras x --max-lora-rank: 8 adapters of rank 64, say). Set from the
# products' count: at 512 the wasted ones reach an eighth of a 4096-wide
# projection's own, where the gathered kernels' CUDA-core speed (a third of
# the base model's throughput, measured at 8 x 16) is still far worse.
DENSE_MAX_SLOT_COLUMNS = 512


def lora_kernel_name(kernel: str, num_slots: int, max_rank: int, device: torch.device) -> str:
    """dense or gathered: what --lora-kernel resolves to on the device."""
    if device.type != "cuda":
        if kernel == "gathered":
            raise ValueError("--lora-kernel gathered runs CUDA kernels; on the CPU use auto or dense")
        return "dense"
    if kernel == "auto":
        return "dense" if num_slots * max_rank <= DENSE_MAX_SLOT_COLUMNS else "gathered"
    return kernel


class LoraContext:
    """The adapter slot of every token of the current forward pass, shared by
    all the LoRA projections of a model; the runner binds it before each
    forward (inside a decode graph, from the graph's static slot buffer)."""

    def __init__(self, num_slots: int, max_rank: int, device: torch.device, kernel: str = "auto"):
        self.num_slots = num_slots
        self.kernel = lora_kernel_name(kernel, num_slots, max_rank, device)
        # Both add to the projection's output in place.
        self.add_lora = cuda_lora.add_lora if self.kernel == "gathered" else reference.add_lora
        self.token_slots: torch.Tensor | None = None

    def bind(self, token_slots: torch.Tensor | None) -> None:
        """token_slots [tokens] int64 on the device: each token's slot, -1 for
        the base model; None when no token has an adapter (the projections
        then skip LoRA). A decode graph binds its static slot buffer, which
        the captured kernels read at every replay."""
        self.token_slots = token_slots


class LoraLinear(nn.Module):
    """A projection (any linear() module) plus the adapters of every slot.
    `lora_a` [in, parts, slots, max_rank] (A transposed, part by part) and
    `lora_b` [slots, max_rank, out] (B transposed): laid out so that the
    kernels' neighbouring threads read neighbouring values, and the
    reference's GEMMs take views of them."""

    def __init__(self, base: nn.Module, input_size: int, part_sizes: list[int], max_rank: int, context: LoraContext, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.input_size = input_size
        self.part_sizes = part_sizes
        self.max_rank = max_rank
        self.context = context
        slots = context.num_slots
        self.register_buffer("lora_a", torch.zeros(input_size, len(part_sizes), slots, max_rank, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(slots, max_rank, sum(part_sizes), dtype=dtype, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        token_slots = self.context.token_slots
        if token_slots is None:
            return out
        return self.context.add_lora(out, x, self.lora_a, self.lora_b, token_slots, self.part_sizes)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[:, :, slot].zero_()
        self.lora_b[slot].zero_()

    def set_part(self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a [rank, in] and b [part's rows, rank] (scale folded in) into slot's part."""
        rank = a.shape[0]
        columns = slice(sum(self.part_sizes[:part]), sum(self.part_sizes[: part + 1]))
        self.lora_a[:, part, slot, :rank].copy_(a.t(), non_blocking=True)
        self.lora_b[slot, :rank, columns].copy_(b.t(), non_blocking=True)
