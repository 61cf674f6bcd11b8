"""A mixture-of-experts layer (services/engine/executor/layers/moe.py) on the
GPU, Mixtral-8x7B-shaped by default, against two ceilings measured in the
same run: the same FLOPs as one dense GEMM pair (every routed row through one
expert's weights, as if routing cost nothing), and the time the expert
weights it must read take at the device's copy bandwidth (all experts hit by
the batch's routing). Each call runs inside a CUDA graph, as decode steps do.
Prints one JSON line per token count, with the dense-over-experts fallback's
time beside it while it fits.

    python -m benchmarks.moe [--tokens 1,4,16,64,256,1024,4096] [--hidden 4096 --intermediate 14336 --experts 8 --top-k 2]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.attention import copy_bandwidth, emit, time_graph
from pagewire.services.engine.executor.backend import CUDA_KERNELS
from pagewire.services.engine.executor.layers.moe import MoE, route

DENSE_FALLBACK_MAX_TOKENS = 1024  # it runs every expert over every token: past this it only takes long


def measure(layer: MoE, tokens: int, args: argparse.Namespace, copy_bytes_per_second: float) -> dict:
    x = torch.randn(tokens, args.hidden, device="cuda", dtype=torch.bfloat16)
    weights, experts = route(layer.gate(x), args.top_k, True)
    rows = tokens * args.top_k
    expert_bytes = 3 * args.hidden * args.intermediate * 2
    hit = len(torch.unique(experts))
    record = dict(
        bench="moe_layer", tokens=tokens, hidden=args.hidden, intermediate=args.intermediate, experts=args.experts, top_k=args.top_k,
        experts_hit=hit,
    )  # fmt: skip
    seconds = time_graph([lambda: layer(x)], args.replays)
    flops = 2 * rows * 3 * args.hidden * args.intermediate
    gate_up, down = layer.experts.gate_up_proj[0], layer.experts.down_proj[0]
    routed = torch.randn(rows, args.hidden, device="cuda", dtype=torch.bfloat16)
    gemm_seconds = time_graph([lambda: F.linear(F.linear(routed, gate_up)[:, : args.intermediate], down)], args.replays)
    read_seconds = hit * expert_bytes / copy_bytes_per_second
    record.update(
        pagewire_us=round(seconds * 1e6, 1),
        pagewire_TFLOPS=round(flops / seconds / 1e12, 1),
        dense_gemm_same_flops_us=round(gemm_seconds * 1e6, 1),
        weight_read_at_copy_bandwidth_us=round(read_seconds * 1e6, 1),
        fraction_of_ceiling=round(max(gemm_seconds, read_seconds) / seconds, 3),
    )
    if tokens <= DENSE_FALLBACK_MAX_TOKENS:
        dense_seconds = time_graph([lambda: layer.dense(x, weights, experts)], args.replays)
        expected = layer.dense(x, weights, experts).float()
        error = ((layer(x).float() - expected).norm() / expected.norm()).item()
        record.update(dense_fallback_us=round(dense_seconds * 1e6, 1), relative_error_vs_dense=float(f"{error:.2e}"))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,4,16,64,256,1024,4096")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--replays", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = MoE(args.hidden, args.intermediate, args.experts, args.top_k, True, CUDA_KERNELS).to(torch.bfloat16)
    for param in layer.parameters():
        param.data.normal_(0, 0.02)
    copy_bytes_per_second = copy_bandwidth()
    emit(dict(bench="device_copy", device=torch.cuda.get_device_name(), GB_s=round(copy_bytes_per_second / 1e9, 1)))
    for tokens in map(int, args.tokens.split(",")):
        emit(measure(layer, tokens, args, copy_bytes_per_second))


if __name__ == "__main__":
    main()
