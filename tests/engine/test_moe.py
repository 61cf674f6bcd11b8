"""The mixture-of-experts layer equals a per-token loop over each token's
top-k experts, through grouped GEMMs and through the dense fallback, with
and without renormalised routing weights; on a GPU, in bf16 and inside a
captured CUDA graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagewire.services.engine.executor.backend import CPU, CUDA_KERNELS
from pagewire.services.engine.executor.layers.moe import MoE, route

HIDDEN, INTERMEDIATE, NUM_EXPERTS = 64, 32, 6


def _moe(top_k: int, renormalize: bool, device: str = "cpu", dtype: torch.dtype = torch.float32) -> MoE:
    torch.manual_seed(0)
    layer = MoE(HIDDEN, INTERMEDIATE, NUM_EXPERTS, top_k, renormalize, CUDA_KERNELS if device == "cuda" else CPU)
    for param in layer.parameters():
        param.data.normal_(0, 0.2)
    return layer.to(device, dtype)


def _per_token(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token through each of its experts, one at a time, in float32."""
    weights, experts = route(layer.gate(x).float(), layer.top_k, layer.renormalize)
    out = torch.zeros(x.shape[0], HIDDEN)
    for t in range(x.shape[0]):
        for weight, e in zip(weights[t].tolist(), experts[t].tolist()):
            gate, up = F.linear(x[t].float(), layer.experts.gate_up_proj[e].float()).chunk(2)
            out[t] += weight * F.linear(F.silu(gate) * up, layer.experts.down_proj[e].float())
    return out


@pytest.mark.parametrize(("top_k", "renormalize"), [(2, True), (3, False), (1, True)])
@pytest.mark.parametrize("path", ["grouped", "dense"])
def test_moe_equals_each_tokens_experts(top_k: int, renormalize: bool, path: str) -> None:
    layer = _moe(top_k, renormalize)
    # 1 token, and enough that some experts take none.
    for num_tokens in (1, 2, 37):
        x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(num_tokens))
        weights, experts = route(layer.gate(x), top_k, renormalize)
        torch.testing.assert_close(getattr(layer, path)(x, weights, experts), _per_token(layer, x), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_moe_on_the_gpu_in_bf16_and_a_cuda_graph() -> None:
    layer = _moe(2, True, "cuda", torch.bfloat16)
    x = torch.randn(48, HIDDEN, device="cuda").to(torch.bfloat16)
    expected = _per_token(layer.cpu().float(), x.cpu().float()).cuda()
    layer.cuda().to(torch.bfloat16)
    torch.testing.assert_close(layer(x).float(), expected, rtol=3e-2, atol=3e-2)
    static_in = x.clone()
    layer(static_in)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_in)
    static_in.copy_(x.flip(0))
    graph.replay()
    torch.testing.assert_close(static_out.float(), expected.flip(0), rtol=3e-2, atol=3e-2)
