"""The projections of a decode step on the GPU: each of a model's
projection shapes at a few tokens, through the GEMV (kernels/gemv.cu, bf16
and weight-only FP8, at the token counts it takes), through
torch._scaled_mm with per-token activation quantization (with and without
fast accumulation), and as the bf16
GEMM that FP8 has to beat; and that quantization alone, in torch's kernels
(kernels/reference.py: quantize_rows) and in kernels/fp8_quant.cu, the one
_scaled_mm takes. Each op is timed as 32
calls on rotating weight copies inside one CUDA graph, so the weights are
read from memory, not from the L2 cache. Prints one JSON line per row.

    python -m benchmarks.fp8_linear [--shape llama-8b] [--tokens 1,2,4,8] [--replays 30]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.attention import emit, time_graph
from pagewire.kernels import cuda_fp8_quant, cuda_gemv, reference
from pagewire.services.engine.executor.layers.fp8 import fp8_linear_scaled_mm, quantize_rows

# qkv, o, gate_up, down and the LM head as (out, in).
PROJECTIONS = {
    "llama-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)},
    "llama-1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192), "lm_head": (128256, 2048)},
}
# The calls rotate over weight copies of at least this many bytes in all
# (at least two copies), far past an H200's 50 MB L2.
ROTATION_BYTES = 256 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(PROJECTIONS), default="llama-8b")
    parser.add_argument("--tokens", default="1,2,4,8")
    parser.add_argument("--replays", type=int, default=30)
    args = parser.parse_args()
    emit({"bench": "fp8_linear", "device": torch.cuda.get_device_name()})
    for name, (n, k) in PROJECTIONS[args.shape].items():
        copies = max(2, -(-ROTATION_BYTES // (2 * n * k)))
        dense = [torch.randn(n, k, device="cuda").to(torch.bfloat16) for _ in range(copies)]
        quantized = [quantize_rows(w) for w in dense]
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ops = {
                "bf16_gemm": lambda i: F.linear(x, dense[i % copies]),
                "scaled_mm": lambda i: fp8_linear_scaled_mm(x, *quantized[i % copies], None, fast_accum=False),
                "scaled_mm_fast_accum": lambda i: fp8_linear_scaled_mm(x, *quantized[i % copies], None),
                "quantize_torch": lambda i: reference.quantize_rows(x),
                "quantize_kernel": lambda i: cuda_fp8_quant.quantize_rows(x),
            }
            if cuda_gemv.supports(x, dense[0]):
                ops["bf16_gemv"] = lambda i: cuda_gemv.gemv(x, dense[i % copies])
            if cuda_gemv.supports(x, quantized[0][0]):
                ops["fp8_gemv"] = lambda i: cuda_gemv.gemv(x, *quantized[i % copies])
            record = {"bench": "fp8_linear", "shape": args.shape, "projection": name, "out": n, "in": k, "tokens": m}
            for op, call in ops.items():
                seconds = time_graph([lambda i=i, call=call: call(i) for i in range(32)], args.replays)
                record[f"{op}_us"] = round(seconds * 1e6, 2)
            emit(record)


if __name__ == "__main__":
    main()
