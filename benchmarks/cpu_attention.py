"""Decode attention on the CPU (kernels/cpu_attention.py) at the embedded
model's heads: one decode row per sequence, --layers calls a step, each
layer over its own paged cache as in the engine. Contexts are drawn
uniformly from --contexts (seeded); --layout consecutive hands each sequence
consecutive blocks (what the block pool does on a fresh engine), scattered a
random permutation (a long-running one). Prints one JSON line per (dtype,
layout): the median over --repeat steps of the time per call, and the load
average when it ran (the CPU may be shared).

    python -m benchmarks.cpu_attention [--batch 32] [--contexts 100-600] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from pagewire.kernels import cpu_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def measure(args: argparse.Namespace, dtype: torch.dtype, layout: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    low, high = map(int, args.contexts.split("-"))
    context_lens = torch.randint(low, high + 1, (args.batch,), generator=generator, dtype=torch.int32)
    blocks_per_seq = ((context_lens + args.block_size - 1) // args.block_size).tolist()
    num_blocks = sum(blocks_per_seq)
    order = torch.arange(num_blocks) if layout == "consecutive" else torch.randperm(num_blocks, generator=generator)
    block_tables = torch.zeros(args.batch, max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = order[used : used + count]
        used += count
    shape = (num_blocks, args.block_size, args.num_kv_heads, args.head_dim)
    caches = [(torch.randn(shape, generator=generator).to(dtype), torch.randn(shape, generator=generator).to(dtype)) for _ in range(args.layers)]
    query = torch.randn(args.batch, args.num_heads, args.head_dim, generator=generator).to(dtype)
    query_start_loc = torch.arange(args.batch + 1, dtype=torch.int32)
    scale = args.head_dim**-0.5

    def step() -> None:
        for key_cache, value_cache in caches:
            cpu_attention.paged_attention(query, key_cache, value_cache, block_tables, context_lens, query_start_loc, scale)

    step()  # warm-up: allocations, SDPA dispatch
    seconds = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds)
    return dict(
        bench="cpu_decode_attention", dtype=str(dtype).removeprefix("torch."), layout=layout, batch=args.batch, contexts=args.contexts,
        mean_context=round(float(context_lens.float().mean()), 1), num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim, block_size=args.block_size, layers=args.layers, threads=torch.get_num_threads(),
        us_per_call=round(step_s / args.layers * 1e6, 1), ms_per_step=round(step_s * 1e3, 2),
        steps_ms=[round(s * 1e3, 1) for s in seconds], load_average=[round(x, 2) for x in os.getloadavg()],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--contexts", default="100-600", help="low-high, inclusive")
    parser.add_argument("--num-heads", type=int, default=9)
    parser.add_argument("--num-kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--layouts", default="consecutive,scattered")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    for name in args.dtypes.split(","):
        for layout in args.layouts.split(","):
            emit(measure(args, DTYPES[name], layout))


if __name__ == "__main__":
    main()
