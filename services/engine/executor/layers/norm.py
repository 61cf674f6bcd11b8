"""RMSNorm with the residual add fused in, through the kernel backend."""

from __future__ import annotations

import torch
from torch import nn

from pagewire.services.engine.executor.backend import KernelBackend


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, backend: KernelBackend):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without a residual, x itself starts the stream."""
        if residual is None:
            return self.backend.rms_norm(x, self.weight, self.eps), x
        return self.backend.add_rms_norm(x, residual, self.weight, self.eps)
