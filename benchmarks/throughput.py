"""The standard workload on the GPU: pagewire's engine in-process, then the HF
transformers `generate` peer (benchmarks/hf_peer.py) in the same run, on
random bf16 weights of real model shapes.

Workload: --requests requests (256) of --prompt-len random prompt ids (512),
--output-len output tokens each (128), greedy, EOS ignored, all submitted at
once. Prints one JSON line per system and shape, then the ratio.

    python benchmarks/throughput.py [--shapes smollm2-135m,llama-1b,llama-8b]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

import hf_peer
from services.common.logging import configure_logging
from services.engine.attention import select_backend
from services.engine.config import EngineConfig
from services.engine.engine import EngineCore
from services.engine.loader import LoadedModel
from services.engine.models.llama import LlamaForCausalLM, ModelConfig
from services.engine.sequence import SamplingParams

INIT_STD = 0.02  # HF's initializer_range for Llama


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def random_model(shape: str, dtype: torch.dtype, max_model_len: int) -> LoadedModel:
    """The engine's model at hf_peer's shape with random weights, built on the
    GPU directly (writing and reading an 8B checkpoint would cost minutes)."""
    spec = hf_peer.SHAPES[shape]
    config = ModelConfig(
        architecture="llama",
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_layers=spec["num_hidden_layers"],
        num_heads=spec["num_attention_heads"],
        num_kv_heads=spec["num_key_value_heads"],
        head_dim=spec["head_dim"],
        rms_norm_eps=1e-5,
        rope_theta=spec["rope_theta"],
        max_position_embeddings=max_model_len,
        tie_word_embeddings=spec["tie_word_embeddings"],
        qkv_bias=False,
        eos_token_ids=(),
    )
    device = torch.device("cuda")
    with torch.device("meta"):
        model = LlamaForCausalLM(config, select_backend(device), max_model_len)
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            parameter.fill_(1.0)
        else:
            parameter.normal_(0.0, INIT_STD, generator=generator)
    model.model.rotary.compute_tables(device)
    return LoadedModel(model.eval(), config, f"random-{shape}", device, dtype)


def percentiles(values: list[float], prefix: str) -> dict:
    quantiles = statistics.quantiles(values, n=100, method="inclusive")
    return {f"{prefix}_p50_ms": round(quantiles[49] * 1e3, 2), f"{prefix}_p90_ms": round(quantiles[89] * 1e3, 2),
            f"{prefix}_p99_ms": round(quantiles[98] * 1e3, 2)}  # fmt: skip


def run_engine(core: EngineCore, prompts: list[list[int]], output_len: int) -> dict:
    """Submit every prompt at once and step until all finish; per-request
    first-token and finish times, and where the step time went."""
    sampling = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for index, ids in enumerate(prompts):
        core.add_request(f"r{index}", ids, sampling)
    first_token: dict[str, float] = {}
    finished: dict[str, float] = {}
    output_tokens = 0
    phase_seconds = {"decode": 0.0, "prefill_or_mixed": 0.0}
    phase_steps = {"decode": 0, "prefill_or_mixed": 0}
    while core.has_unfinished():
        scheduler = core.scheduler
        phase = "decode" if not scheduler.waiting and all(s.num_tokens - s.num_computed_tokens == 1 for s in scheduler.running) else "prefill_or_mixed"
        step_start = time.perf_counter()
        outputs = core.step()
        now = time.perf_counter()
        phase_seconds[phase] += now - step_start
        phase_steps[phase] += 1
        for output in outputs:
            output_tokens += len(output.new_token_ids)
            first_token.setdefault(output.request_id, now)
            if output.finished:
                finished[output.request_id] = now
    seconds = time.perf_counter() - start
    ttft = [first_token[r] - start for r in first_token]
    tpot = [(finished[r] - first_token[r]) / (output_len - 1) for r in finished]
    return dict(
        seconds=round(seconds, 3), output_tokens=output_tokens, out_tok_s=round(output_tokens / seconds, 1),
        **percentiles(ttft, "ttft"), **percentiles(tpot, "tpot"),
        decode_steps=phase_steps["decode"], decode_seconds=round(phase_seconds["decode"], 3),
        prefill_or_mixed_steps=phase_steps["prefill_or_mixed"], prefill_or_mixed_seconds=round(phase_seconds["prefill_or_mixed"], 3),
    )  # fmt: skip


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def benchmark_shape(shape: str, args: argparse.Namespace) -> None:
    workload = dict(shape=shape, requests=args.requests, prompt_len=args.prompt_len, output_len=args.output_len,
                    device=torch.cuda.get_device_name())  # fmt: skip
    prompts = hf_peer.prompts(args.requests, args.prompt_len, hf_peer.SHAPES[shape]["vocab_size"])
    max_model_len = args.prompt_len + args.output_len
    loaded = random_model(shape, torch.bfloat16, max_model_len)
    config = EngineConfig(
        device="cuda", dtype="bfloat16", max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
    )  # fmt: skip
    setup_start = time.perf_counter()
    core = EngineCore(config, loaded)
    setup_seconds = time.perf_counter() - setup_start
    run_engine(core, prompts[: args.max_num_seqs // 4], 8)  # warm-up: every kernel variant loads
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as profiler:
            run_engine(core, prompts[: args.requests // 4], args.output_len)
        with open(f"{args.profile}.{shape}.txt", "w") as table:
            table.write(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    engine = run_engine(core, prompts, args.output_len)
    emit(dict(bench="throughput", system="pagewire", **workload, num_kv_blocks=core.kv_cache.num_blocks,
              setup_seconds=round(setup_seconds, 1), **engine))  # fmt: skip
    del core, loaded
    free_gpu()

    record = dict(bench="throughput", system="hf-generate", **workload, batch_size=args.peer_batch_size)
    try:
        model = hf_peer.build(shape, torch.bfloat16, "cuda", "sdpa")
        hf_peer.run_static(model, prompts[: args.peer_batch_size], 4, args.peer_batch_size, "cuda")  # warm-up
        seconds, tokens = hf_peer.run_static(model, prompts, args.output_len, args.peer_batch_size, "cuda")
        record.update(seconds=round(seconds, 3), output_tokens=tokens, out_tok_s=round(tokens / seconds, 1))
        del model
    except torch.OutOfMemoryError as error:
        record.update(error=str(error)[:300])
    free_gpu()
    emit(record)
    if "out_tok_s" in record:
        emit(dict(bench="throughput_ratio", shape=shape, pagewire_over_hf_generate=round(engine["out_tok_s"] / record["out_tok_s"], 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2-135m,llama-1b,llama-8b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--peer-batch-size", type=int, default=64, help="HF generate's static batch size")
    parser.add_argument("--profile", default="", help="write a torch.profiler table of a quarter-size run to PATH.<shape>.txt")
    args = parser.parse_args()
    configure_logging("warning")  # stdout carries only the JSON lines
    for shape in args.shapes.split(","):
        benchmark_shape(shape, args)


if __name__ == "__main__":
    main()
