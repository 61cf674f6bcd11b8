"""Decode attention bandwidth on the GPU: pagewire's paged kernel against the
device's copy bandwidth and torch SDPA on gathered, contiguous K/V, measured
in the same run.

Achieved bandwidth counts the K/V bytes a decode step must read
(batch x context x kv_heads x head_dim x 2 tensors x element size) over the
kernel's time. Each kernel runs inside a CUDA graph, rotating over enough
copies of the K/V that the working set exceeds the L2 cache. Prints one JSON
line per measurement. --kv-cache-dtype fp8 reads an E4M3 cache (half the
bytes; SDPA then runs on its bf16/fp16 widening, the same values).

--prefill measures the prefill-chunk attention instead: 16 chunks of 512
query tokens (an 8192-token step) attending causally to their own tokens and
to a context of each --prefill-contexts length before them, and one row of
mixed chunks whose contexts run from 0 to 3840; against SDPA with a
bottom-right causal mask on contiguous K/V (one batched call, or one call per
chunk for the mixed row), and the achieved attention TFLOP/s.

    python -m benchmarks.attention [--batches 1,4,16,64,256] [--contexts 512,1024,2048,4096,8192]
    python -m benchmarks.attention --prefill [--prefill-contexts 0,512,1024,2048,4096]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from pagewire.kernels import cuda_ops, reference

WORKING_SET_BYTES = 512 << 20  # well past the H100's 50 MB of L2
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def time_graph(calls: list[Callable[[], object]], replays: int) -> float:
    """Seconds per call: the calls captured once into one CUDA graph, replayed,
    timed with device events; the median over replays."""
    for call in calls:  # compile, load and allocate outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy."""
    source = torch.randn(1 << 28, device="cuda")  # 1 GiB of float32
    destination = torch.empty_like(source)
    seconds = time_graph([lambda: destination.copy_(source)], replays=20)
    return 2 * source.numel() * source.element_size() / seconds


def measure(batch: int, context: int, args: argparse.Namespace, copy_bytes_per_second: float) -> dict:
    dtype = DTYPES[args.dtype]
    fp8 = args.kv_cache_dtype == "fp8"
    cache_dtype = reference.FP8_CACHE_DTYPE if fp8 else dtype
    num_heads, num_kv_heads, head_dim, block_size = args.num_heads, args.num_kv_heads, args.head_dim, args.block_size
    element = torch.finfo(cache_dtype).bits // 8
    kv_bytes = batch * context * num_kv_heads * head_dim * 2 * element
    copies = max(1, math.ceil(WORKING_SET_BYTES / kv_bytes))
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = copies * batch * blocks_per_seq
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = reference.to_cache_dtype(torch.randn(cache_shape, device="cuda", dtype=dtype), cache_dtype, 1.0)
    value_cache = reference.to_cache_dtype(torch.randn(cache_shape, device="cuda", dtype=dtype), cache_dtype, 1.0)
    # Every copy's sequences own scattered blocks, as a long-running server's do.
    block_ids = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(copies, batch, blocks_per_seq)
    query = torch.randn(copies, batch, num_heads, head_dim, device="cuda", dtype=dtype)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5

    def paged(copy: int) -> torch.Tensor:
        return cuda_ops.paged_attention(
            query[copy], key_cache, value_cache, block_ids[copy], seq_lens, query_start_loc, scale,
            max_query_len=1, max_seq_len=context,
        )  # fmt: skip

    def gathered(cache: torch.Tensor, copy: int) -> torch.Tensor:
        """[batch, kv_heads, context, head_dim], contiguous."""
        rows = cache[block_ids[copy].long()].view(batch, blocks_per_seq * block_size, num_kv_heads, head_dim)
        return rows[:, :context].transpose(1, 2).to(dtype).contiguous()

    record: dict = dict(
        bench="decode_attention", batch=batch, context=context, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, block_size=block_size, kv_bytes=kv_bytes, rotated_copies=copies,
    )  # fmt: skip
    tile_rows = cuda_ops.choose_tile_rows(1, num_heads // num_kv_heads)
    kernel, num_splits = cuda_ops.plan_attention(dtype, head_dim, tile_rows, query.device, fp8, batch * num_kv_heads, context)
    record.update(resident_blocks=kernel.resident_blocks, num_splits=num_splits)
    seconds = time_graph([lambda c=c: paged(c) for c in range(copies)], args.replays)
    record.update(
        pagewire_us=round(seconds * 1e6, 2),
        pagewire_GB_s=round(kv_bytes / seconds / 1e9, 1),
        pagewire_fraction_of_copy=round(kv_bytes / seconds / copy_bytes_per_second, 3),
    )
    try:
        keys = [gathered(key_cache, c) for c in range(copies)]
        values = [gathered(value_cache, c) for c in range(copies)]
        queries = [query[c].unsqueeze(2) for c in range(copies)]  # [batch, heads, 1, head_dim]

        def sdpa(copy: int) -> torch.Tensor:
            return F.scaled_dot_product_attention(queries[copy], keys[copy], values[copy], scale=scale, enable_gqa=True)

        sdpa_seconds = time_graph([lambda c=c: sdpa(c) for c in range(copies)], args.replays)
        expected = sdpa(0).squeeze(2).float()
        relative_error = ((paged(0).float() - expected).norm() / expected.norm()).item()
        record.update(
            sdpa_us=round(sdpa_seconds * 1e6, 2),
            sdpa_GB_s=round(kv_bytes // element * (torch.finfo(dtype).bits // 8) / sdpa_seconds / 1e9, 1),  # it reads 16-bit K/V
            pagewire_over_sdpa_speed=round(sdpa_seconds / seconds, 3),
            relative_error_vs_sdpa=float(f"{relative_error:.2e}"),
        )
        keys.clear(), values.clear()  # free the contiguous copies before the next size
    except torch.OutOfMemoryError as error:
        record.update(sdpa_error=str(error)[:200])
    torch.cuda.empty_cache()
    return record


PREFILL_CHUNK = 512
PREFILL_CHUNKS = 16  # an 8192-token prefill step


def measure_prefill(contexts: list[int], label: str, args: argparse.Namespace) -> dict:
    """One step of PREFILL_CHUNKS chunks, chunk i after contexts[i] tokens of its sequence."""
    dtype = DTYPES[args.dtype]
    num_heads, num_kv_heads, head_dim, block_size = args.num_heads, args.num_kv_heads, args.head_dim, args.block_size
    seq_lens_list = [context + PREFILL_CHUNK for context in contexts]
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens_list]
    num_blocks = sum(blocks_per_seq)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, device="cuda", dtype=dtype)
    value_cache = torch.randn(cache_shape, device="cuda", dtype=dtype)
    order = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
    block_tables = torch.zeros(len(contexts), max(blocks_per_seq), dtype=torch.int32, device="cuda")
    used = 0
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = order[used : used + count]
        used += count
    num_tokens = PREFILL_CHUNK * len(contexts)
    query = torch.randn(num_tokens, num_heads, head_dim, device="cuda", dtype=dtype)
    seq_lens = torch.tensor(seq_lens_list, dtype=torch.int32, device="cuda")
    query_start_loc = torch.arange(len(contexts) + 1, dtype=torch.int32, device="cuda") * PREFILL_CHUNK
    scale = head_dim**-0.5

    def paged() -> torch.Tensor:
        return cuda_ops.paged_attention(
            query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
            max_query_len=PREFILL_CHUNK, max_seq_len=max(seq_lens_list),
        )  # fmt: skip

    def contiguous(cache: torch.Tensor, seq: int) -> torch.Tensor:
        """[1, heads, seq_len, head_dim] of one sequence, each KV head repeated
        for its query heads (the bias-mask path of SDPA takes no GQA)."""
        rows = cache[block_tables[seq, : blocks_per_seq[seq]].long()].view(-1, num_kv_heads, head_dim)
        rows = rows[: seq_lens_list[seq]].repeat_interleave(num_heads // num_kv_heads, dim=1)
        return rows.transpose(0, 1).unsqueeze(0).contiguous()

    keys = [contiguous(key_cache, seq) for seq in range(len(contexts))]
    values = [contiguous(value_cache, seq) for seq in range(len(contexts))]
    queries = [query[i * PREFILL_CHUNK : (i + 1) * PREFILL_CHUNK].transpose(0, 1).unsqueeze(0) for i in range(len(contexts))]
    if len(set(contexts)) == 1:  # one batched call
        batched = (torch.cat(queries), torch.cat(keys), torch.cat(values))
        mask = causal_lower_right(PREFILL_CHUNK, seq_lens_list[0])

        def sdpa_calls() -> list[torch.Tensor]:
            return [F.scaled_dot_product_attention(*batched, attn_mask=mask, scale=scale)]
    else:
        masks = [causal_lower_right(PREFILL_CHUNK, n) for n in seq_lens_list]

        def sdpa_calls() -> list[torch.Tensor]:
            return [
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
                for q, k, v, mask in zip(queries, keys, values, masks)
            ]

    seconds = time_graph([paged], args.replays)
    sdpa_seconds = time_graph([sdpa_calls], args.replays)
    expected = torch.cat([out.transpose(1, 2).reshape(-1, num_heads, head_dim) for out in sdpa_calls()]).float()
    relative_error = ((paged().float() - expected).norm() / expected.norm()).item()
    # Q.K^T and P.V over the (query, key) pairs the causal mask keeps.
    pairs = sum(PREFILL_CHUNK * context + PREFILL_CHUNK * (PREFILL_CHUNK + 1) // 2 for context in contexts)
    flops = 4 * pairs * num_heads * head_dim
    return dict(
        bench="prefill_attention", chunks=label, num_tokens=num_tokens, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, dtype=args.dtype, block_size=block_size,
        pagewire_us=round(seconds * 1e6, 2), pagewire_TFLOP_s=round(flops / seconds / 1e12, 1),
        sdpa_us=round(sdpa_seconds * 1e6, 2), sdpa_TFLOP_s=round(flops / sdpa_seconds / 1e12, 1),
        pagewire_over_sdpa_speed=round(sdpa_seconds / seconds, 3), relative_error_vs_sdpa=float(f"{relative_error:.2e}"),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4,16,64,256")
    parser.add_argument("--contexts", default="512,1024,2048,4096,8192")
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="fp8: an E4M3 cache read with the scales at 1")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--prefill", action="store_true", help="prefill-chunk attention instead of decode")
    parser.add_argument("--prefill-contexts", default="0,512,1024,2048,4096")
    args = parser.parse_args()
    if args.prefill:
        emit(dict(bench="device", device=torch.cuda.get_device_name()))
        for context in map(int, args.prefill_contexts.split(",")):
            emit(measure_prefill([context] * PREFILL_CHUNKS, f"{PREFILL_CHUNKS} x {PREFILL_CHUNK} after {context}", args))
        mixed = [i * 256 for i in range(PREFILL_CHUNKS)]
        emit(measure_prefill(mixed, f"{PREFILL_CHUNKS} x {PREFILL_CHUNK} after 0..{mixed[-1]}", args))
        return

    copy_bytes_per_second = copy_bandwidth()
    emit(dict(bench="device_copy", device=torch.cuda.get_device_name(), bytes=2 << 30, GB_s=round(copy_bytes_per_second / 1e9, 1)))
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            emit(measure(batch, context, args, copy_bytes_per_second))


if __name__ == "__main__":
    main()
