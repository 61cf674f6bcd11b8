"""Latency on the GPU: time to first token and time per output token at
small batches (512 prompt tokens, 256 output tokens, greedy, EOS ignored),
beside the time one read of the weights takes at the read bandwidth measured
in the same run: at batch 1 a decode step cannot be faster than that.
--quantization fp8 and --kv-cache-dtype fp8 run the same shapes with FP8
weights and KV cache, to set beside a run without them; --speculative-method
ngram speculates (prompt lookup with n-grams down to one token), and each
record then states the proposals made and accepted in the measured run.
Warm-ups use prompts of their own, so the measured runs hit no prefix cache
(each record says so). Prints one JSON line per shape and batch.

    python -m benchmarks.latency [--shapes smollm2-135m,llama-1b,llama-8b] [--batches 1,2,8,32] [--quantization fp8] [--kv-cache-dtype fp8]
        [--speculative-method ngram --num-speculative-tokens 4]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from benchmarks import hf_peer
from benchmarks.attention import time_graph
from benchmarks.throughput import SHAPES, add_fp8_arguments, emit, engine_config, free_gpu, measured_engine, random_model, run_engine
from pagewire.services.common.logging import configure_logging

READ_BYTES = 4 << 30


def read_bandwidth() -> float:
    """Bytes per second of a read-only pass (a sum) over 4 GiB: what a decode
    step's weight reads can reach, unlike a copy, which also writes."""
    data = torch.ones(READ_BYTES // 2, dtype=torch.bfloat16, device="cuda")
    seconds = time_graph([lambda: torch.sum(data, dtype=torch.float32)], replays=20)
    return READ_BYTES / seconds


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameters (a tied embedding counts once)."""
    seen: dict[int, int] = {}
    for parameter in model.parameters():
        seen[parameter.data_ptr()] = parameter.numel() * parameter.element_size()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2-135m,llama-1b,llama-8b")
    parser.add_argument("--batches", default="1,2,8,32")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    add_fp8_arguments(parser)
    parser.add_argument("--speculative-method", default="none", choices=["none", "ngram"])
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    args = parser.parse_args()
    configure_logging("warning")
    batches = [int(b) for b in args.batches.split(",")]
    args.device, args.max_num_seqs = "cuda", max(batches)
    bandwidth = read_bandwidth()
    device_name = torch.cuda.get_device_name()
    for shape in args.shapes.split(","):
        vocab = SHAPES[shape]["vocab_size"]
        config = dataclasses.replace(
            engine_config(args), speculative_method=args.speculative_method, num_speculative_tokens=args.num_speculative_tokens, ngram_min=1
        )
        loaded = random_model(shape, torch.bfloat16, config.max_model_len, torch.device("cuda"), args.quantization)
        weights = weight_bytes(loaded.model)
        core = measured_engine(config, loaded)
        for batch in batches:
            run_engine(core, hf_peer.prompts(batch, args.prompt_len, vocab, seed=100 + batch), 8)
            before = core.stats()
            measured = run_engine(core, hf_peer.prompts(batch, args.prompt_len, vocab, seed=200 + batch), args.output_len)
            after = core.stats()
            speculation = dict(
                speculative_method=args.speculative_method,
                proposed_tokens=after.spec_decode_draft_tokens_total - before.spec_decode_draft_tokens_total,
                accepted_tokens=after.spec_decode_accepted_tokens_total - before.spec_decode_accepted_tokens_total,
            )
            weight_read_ms = weights / bandwidth * 1e3
            emit(dict(bench="latency", shape=shape, batch=batch, prompt_len=args.prompt_len, output_len=args.output_len, device=device_name,
                      quantization=args.quantization, kv_cache_dtype=core.info.kv_cache_dtype, num_kv_blocks=core.info.num_kv_blocks,
                      async_scheduling=args.async_scheduling, weight_bytes=weights, read_bandwidth_gb_s=round(bandwidth / 1e9, 1),
                      weight_read_ms=round(weight_read_ms, 3), tpot_over_weight_read=round(measured["tpot_p50_ms"] / weight_read_ms, 2),
                      **speculation, **measured))  # fmt: skip
        del core, loaded
        free_gpu()


if __name__ == "__main__":
    main()
