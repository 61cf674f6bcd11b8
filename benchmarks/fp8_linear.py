"""The FP8 projections of a decode step on the GPU: each of llama-8b's
projection shapes at a few tokens, through the weight-only FP8 GEMV
(kernels/fp8_gemv.cu, at the token counts it takes), through
torch._scaled_mm with per-token activation quantization (with and without
fast accumulation), and as the bf16
GEMM that FP8 has to beat; and that quantization alone, in torch's kernels
(kernels/reference.py: quantize_rows) and in kernels/fp8_quant.cu, the one
_scaled_mm takes. Each op is timed as 32
calls on rotating weight copies inside one CUDA graph, so the weights are
read from memory, not from the L2 cache. Prints one JSON line per row.

    python -m benchmarks.fp8_linear [--tokens 1,2,4,8] [--replays 30]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.attention import emit, time_graph
from pagewire.kernels import cuda_fp8_quant, cuda_gemv, reference
from pagewire.services.engine.executor.layers.fp8 import fp8_linear_scaled_mm, quantize_rows

# llama-8b: qkv, o, gate_up, down as (out, in).
PROJECTIONS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
COPIES = 4  # weight copies the calls rotate over: 4 x 235 MB is far past the L2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,2,4,8")
    parser.add_argument("--replays", type=int, default=30)
    args = parser.parse_args()
    emit({"bench": "fp8_linear", "device": torch.cuda.get_device_name()})
    for name, (n, k) in PROJECTIONS.items():
        dense = [torch.randn(n, k, device="cuda").to(torch.bfloat16) for _ in range(COPIES)]
        quantized = [quantize_rows(w) for w in dense]
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ops = {
                "bf16_gemm": lambda i: F.linear(x, dense[i % COPIES]),
                "scaled_mm": lambda i: fp8_linear_scaled_mm(x, *quantized[i % COPIES], None, fast_accum=False),
                "scaled_mm_fast_accum": lambda i: fp8_linear_scaled_mm(x, *quantized[i % COPIES], None),
                "quantize_torch": lambda i: reference.quantize_rows(x),
                "quantize_kernel": lambda i: cuda_fp8_quant.quantize_rows(x),
            }
            if cuda_gemv.supports(x, quantized[0][0]):
                ops["fp8_gemv"] = lambda i: cuda_gemv.fp8_gemv(x, *quantized[i % COPIES])
            record = {"bench": "fp8_linear", "projection": name, "out": n, "in": k, "tokens": m}
            for op, call in ops.items():
                seconds = time_graph([lambda i=i, call=call: call(i) for i in range(32)], args.replays)
                record[f"{op}_us"] = round(seconds * 1e6, 2)
            emit(record)


if __name__ == "__main__":
    main()
