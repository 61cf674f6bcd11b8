"""The small layer kernels (kernels/layer_ops.cu) at decode and prefill batch
sizes, each beside the time its bytes would take at the device's copy
bandwidth, measured in the same run. Each call is timed inside a CUDA graph
of many calls over separate inputs, so launch gaps are excluded as they are
in the engine's decode graphs. Prints one JSON line per (shape, op, batch).

    python -m benchmarks.layer_ops [--batches 1,2,16,256] [--shapes smollm2-135m,llama-1b,llama-8b]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks import hf_peer
from benchmarks.attention import copy_bandwidth, emit, time_graph
from pagewire.kernels import cuda_layer_ops

CALLS_PER_GRAPH = 64


def _ops(shape: dict, batch: int, dtype: torch.dtype) -> dict[str, tuple[Callable[[int], object], int]]:
    """Per op: a call over the i-th copy of its inputs, and the bytes it moves."""
    hidden, width = shape["hidden_size"], shape["intermediate_size"]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape.get("head_dim") or hidden // heads
    size = torch.finfo(dtype).bits // 8
    copies = CALLS_PER_GRAPH

    def tensors(*dims: int) -> list[torch.Tensor]:
        return [torch.randn(*dims, device="cuda").to(dtype) for _ in range(copies)]

    x, residual, gate_up = tensors(batch, hidden), tensors(batch, hidden), tensors(batch, 2 * width)
    qkv = tensors(batch, (heads + 2 * kv_heads) * head_dim)
    weight = torch.rand(hidden, device="cuda").to(dtype) + 0.5
    positions = torch.randint(0, 4096, (batch,), device="cuda")
    angles = torch.randn(4096, head_dim, device="cuda")
    cos, sin = angles.cos(), angles.sin()

    def rotary(i: int) -> object:
        query = qkv[i][:, : heads * head_dim].view(batch, heads, head_dim)
        key = qkv[i][:, heads * head_dim : (heads + kv_heads) * head_dim].view(batch, kv_heads, head_dim)
        return cuda_layer_ops.rotary_embedding(positions, query, key, cos, sin)

    return {
        "rms_norm": (lambda i: cuda_layer_ops.rms_norm(x[i], weight, 1e-5), 2 * batch * hidden * size + hidden * size),
        "add_rms_norm": (lambda i: cuda_layer_ops.add_rms_norm(x[i], residual[i], weight, 1e-5), 4 * batch * hidden * size + hidden * size),
        "rotary_embedding": (rotary, 2 * batch * (heads + kv_heads) * head_dim * size + 2 * batch * head_dim * 4),
        "silu_and_mul": (lambda i: cuda_layer_ops.silu_and_mul(gate_up[i]), 3 * batch * width * size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,2,16,256")
    parser.add_argument("--shapes", default="smollm2-135m,llama-1b,llama-8b")
    parser.add_argument("--replays", type=int, default=50)
    args = parser.parse_args()
    dtype = torch.bfloat16
    bandwidth = copy_bandwidth()
    emit({"bench": "layer_ops", "device": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1)})
    for shape_name in args.shapes.split(","):
        shape = hf_peer.SHAPES[shape_name]
        for batch in (int(b) for b in args.batches.split(",")):
            for op, (call, moved) in _ops(shape, batch, dtype).items():
                seconds = time_graph([lambda i=i: call(i) for i in range(CALLS_PER_GRAPH)], args.replays)
                emit(
                    {
                        "bench": "layer_ops",
                        "shape": shape_name,
                        "op": op,
                        "batch": batch,
                        "us": round(seconds * 1e6, 2),
                        "bytes": moved,
                        "bytes_bound_us": round(moved / bandwidth * 1e6, 2),
                    }
                )


if __name__ == "__main__":
    main()
