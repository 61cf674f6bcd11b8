"""Mixture of experts (Mixtral, Qwen3-MoE): a router scores the experts of
each token, its top_k take the token, and their outputs are summed with the
router's softmax weights (renormalised over the top_k where the model says).

The experts' weights are two 3D tensors, as transformers holds them:
experts.gate_up_proj [num_experts, 2 * intermediate, hidden] (gate rows, then
up rows) and experts.down_proj [num_experts, hidden, intermediate]. Every
shape in the forward pass is fixed by the number of tokens, with no host
sync, so a CUDA graph can capture it: the (token, expert) pairs are sorted by
expert and each expert multiplies its run of rows in one grouped GEMM
(torch's grouped_mm). Where grouped_mm has no kernel for the dtype (CUDA
takes only bf16), every expert runs over every token instead, weighted by a
routing matrix that is zero outside each token's top_k."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagewire.services.engine.executor.backend import KernelBackend
from pagewire.services.engine.executor.layers.linear import linear


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 weights, expert ids), each [num_tokens, top_k]: the top_k of the
    softmax over experts, rescaled to sum to 1 when `renormalize`."""
    weights, experts = torch.topk(router_logits.float().softmax(dim=-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def grouped_mm_supported(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" or x.dtype == torch.bfloat16


class MoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool, backend: KernelBackend):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.backend = backend
        self.gate = linear(hidden_size, num_experts)  # the router
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.experts.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(self.gate(x), self.top_k, self.renormalize)
        if grouped_mm_supported(x):
            return self.grouped(x, weights, experts)
        return self.dense(x, weights, experts)

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each token's rows go to its top_k experts, in one grouped GEMM per projection."""
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        # Where each expert's run of sorted rows ends.
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        ends = counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32)).cumsum(0, dtype=torch.int32)
        rows = x[order // self.top_k]
        hidden = self.backend.silu_and_mul(F.grouped_mm(rows, self.experts.gate_up_proj.transpose(1, 2), offs=ends))
        sorted_out = F.grouped_mm(hidden, self.experts.down_proj.transpose(1, 2), offs=ends)
        out = torch.empty_like(sorted_out)
        out[order] = sorted_out
        return self._combine(out.view(*experts.shape, -1), weights, x.dtype)

    def dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Every expert over every token; the routing weights pick the top_k."""
        routing = torch.zeros(x.shape[0], self.num_experts, dtype=torch.float32, device=x.device).scatter_(1, experts, weights)
        experts_weights = zip(self.experts.gate_up_proj, self.experts.down_proj)
        out = torch.stack([F.linear(self.backend.silu_and_mul(F.linear(x, gate_up)), down) for gate_up, down in experts_weights], dim=1)
        return self._combine(out, routing, x.dtype)

    @staticmethod
    def _combine(out: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sum_k weights[t, k] * out[t, k], in float32."""
        return (out.float() * weights.unsqueeze(-1)).sum(dim=1).to(dtype)
