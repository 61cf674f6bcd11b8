"""The standard workload on the GPU: pagewire's engine in-process, then the HF
transformers `generate` peer (benchmarks/hf_peer.py) in the same run, on
random bf16 weights of real model shapes. With --gateway, the same model then
runs behind `pagewire serve` (tokenizer, engine and gateway as processes) and
the same prompts go through the public gRPC `Generate` stream, then (other
prompts, same warm-up) straight to the served engine's own `Generate` stream
(benchmarks/through_gateway.py).

Workload: --requests requests (256) of --prompt-len random prompt ids (512),
--output-len output tokens each (128), greedy, EOS ignored, all submitted at
once. Prints one JSON line per system and shape, then the ratios.

    python -m benchmarks.throughput [--shapes smollm2-135m,llama-1b,llama-8b] [--gateway]

A cheap check of the whole path on a CPU:

    python -m benchmarks.throughput --device cpu --shapes tiny --requests 16 --prompt-len 64 --output-len 16 --no-peer --gateway
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import hf_peer, through_gateway
from pagewire.services.common.logging import configure_logging
from pagewire.services.engine.executor.backend import select_backend
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.executor.model_executor import create_engine_core, freeze_long_lived_objects
from pagewire.services.engine.executor.layers.fp8 import FP8_DTYPE, quantize_rows
from pagewire.services.engine.executor.loader import LoadedModel, cast_to_compute_dtype, resolve_dtype
from pagewire.services.engine.executor.models.llama import LlamaForCausalLM, ModelConfig
from pagewire.services.engine.core.sequence import SamplingParams
from tests.support.harness import ServeProcess, engine_stats

INIT_STD = 0.02  # HF's initializer_range for Llama
WARM_UP_SEED = 7  # the measured prompts use hf_peer's seeds 0-4
# "tiny" exercises the whole path on a CPU in seconds; it has no HF peer run.
SHAPES = hf_peer.SHAPES | {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, vocab_size=1024, tie_word_embeddings=True, rope_theta=10000.0),
}  # fmt: skip


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def random_model(shape: str, dtype: torch.dtype, max_model_len: int, device: torch.device, quantization: str = "none") -> LoadedModel:
    """The engine's model at hf_peer's shape with random weights, built on the
    device directly (writing and reading an 8B checkpoint would cost minutes).
    With quantization fp8 each projection's random weight is quantized per
    output channel, as the loader does with a 16-bit checkpoint."""
    spec = SHAPES[shape]
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
        quantization=quantization,
    )
    return LoadedModel(build_random(config, dtype, max_model_len, device), config, f"random-{shape}", device, dtype)


def build_random(config: ModelConfig, dtype: torch.dtype, max_model_len: int, device: torch.device) -> LlamaForCausalLM:
    """The engine's model of `config` on the device, its weights drawn as HF
    initializes them (norms at 1); FP8 projections quantized per output channel."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, select_backend(device), max_model_len)
    model = model.to_empty(device=device)
    cast_to_compute_dtype(model, dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            parameter.fill_(1.0)
        elif parameter.dtype == FP8_DTYPE:
            weight, scale = quantize_rows(torch.empty(parameter.shape, dtype=dtype, device=device).normal_(0.0, INIT_STD, generator=generator))
            parameter.copy_(weight)
            model.get_parameter(f"{name}_scale").copy_(scale)
        elif not name.endswith("weight_scale"):  # scales come with their FP8 weight
            parameter.normal_(0.0, INIT_STD, generator=generator)
    model.model.rotary.compute_tables(device)
    return model.eval()


def percentiles(values: list[float], prefix: str) -> dict:
    # quantiles() needs two points; one request's figure is every percentile.
    quantiles = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {f"{prefix}_p50_ms": round(quantiles[49] * 1e3, 2), f"{prefix}_p90_ms": round(quantiles[89] * 1e3, 2),
            f"{prefix}_p99_ms": round(quantiles[98] * 1e3, 2)}  # fmt: skip


def summarize(start: float, first_token: dict[str, float], finished: dict[str, float], output_tokens: int, seconds: float, output_len: int) -> dict:
    """Throughput and TTFT/TPOT percentiles from per-request first-token and finish times."""
    ttft = [first_token[r] - start for r in first_token]
    tpot = [(finished[r] - first_token[r]) / (output_len - 1) for r in finished]
    return dict(seconds=round(seconds, 3), output_tokens=output_tokens, out_tok_s=round(output_tokens / seconds, 1),
                **percentiles(ttft, "ttft"), **percentiles(tpot, "tpot"))  # fmt: skip


def run_engine(
    core: EngineCore,
    prompts: list[list[int]],
    output_len: int,
    loras: list[str] | None = None,
    outputs: dict[str, list[int]] | None = None,
    compiled_grammar: str = "",
) -> dict:
    """Submit every prompt at once and step until all finish; per-request
    first-token and finish times, where the step time went, and the prefix
    cache hits of this run. With `loras`, request i runs with loras[i % len];
    `outputs` collects each request's tokens by request id; a compiled
    grammar constrains every request (which then ends where its grammar
    lets it, so end-of-sequence is not ignored)."""
    sampling = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=not compiled_grammar)
    hits_before = core.stats().prefix_cache_hit_tokens
    start = time.perf_counter()
    for index, ids in enumerate(prompts):
        core.add_request(f"r{index}", ids, sampling, lora=loras[index % len(loras)] if loras else "", compiled_grammar=compiled_grammar)
    first_token: dict[str, float] = {}
    finished: dict[str, float] = {}
    output_tokens = 0
    phase_seconds = {"decode": 0.0, "prefill_or_mixed": 0.0}
    phase_steps = {"decode": 0, "prefill_or_mixed": 0}
    while core.has_unfinished():
        scheduler = core.scheduler
        phase = "decode" if not scheduler.waiting and all(s.num_tokens - s.num_computed_tokens == 1 for s in scheduler.running) else "prefill_or_mixed"
        step_start = time.perf_counter()
        step_outputs = core.step()
        now = time.perf_counter()
        phase_seconds[phase] += now - step_start
        phase_steps[phase] += 1
        for output in step_outputs:
            output_tokens += len(output.new_token_ids)
            if outputs is not None:
                outputs.setdefault(output.request_id, []).extend(output.new_token_ids)
            first_token.setdefault(output.request_id, now)
            if output.finished:
                finished[output.request_id] = now
    seconds = time.perf_counter() - start
    return dict(
        **summarize(start, first_token, finished, output_tokens, seconds, output_len),
        decode_steps=phase_steps["decode"], decode_seconds=round(phase_seconds["decode"], 3),
        prefill_or_mixed_steps=phase_steps["prefill_or_mixed"], prefill_or_mixed_seconds=round(phase_seconds["prefill_or_mixed"], 3),
        prefix_cache_hit_tokens=core.stats().prefix_cache_hit_tokens - hits_before,
    )  # fmt: skip


def measured_engine(config: EngineConfig, loaded: LoadedModel) -> EngineCore:
    """An engine core as the engine's process holds one: built, then its
    long-lived objects frozen out of the garbage collector's full passes
    (free_gpu() hands them back)."""
    core = create_engine_core(config, loaded)
    freeze_long_lived_objects()
    return core


def free_gpu() -> None:
    # What a measured engine froze (freeze_long_lived_objects) is garbage now.
    gc.unfreeze()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings of both the in-process and the served engine."""
    return EngineConfig(
        device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32", max_model_len=args.prompt_len + args.output_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        async_scheduling=args.async_scheduling, kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
    )  # fmt: skip


def add_fp8_arguments(parser: argparse.ArgumentParser) -> None:
    """FP8 weights and KV cache, to compare against the same run without them."""
    parser.add_argument("--quantization", default="none", choices=["none", "fp8"], help="fp8: the random projections quantized per output channel")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="fp8: an E4M3 KV cache (twice the blocks)")


def warm_up_prompts(measured: list[list[int]], args: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    """Prompts of the warm-up run (8 output tokens each) that loads every kernel
    variant: random ones of their own, so that the measured run finds none of
    its blocks in the prefix cache."""
    warm = hf_peer.prompts(max(1, args.max_num_seqs // 4), len(measured[0]), vocab_size, seed=WARM_UP_SEED)
    assert not {tuple(p) for p in warm} & {tuple(p) for p in measured}
    return warm


def served_engine_flags(args: argparse.Namespace) -> list[str]:
    """`pagewire serve`'s flags for the engine settings of the in-process run."""
    config = engine_config(args)
    return ["--device", config.device, "--dtype", config.dtype, "--max-model-len", str(config.max_model_len),
            "--max-num-seqs", str(config.max_num_seqs), "--max-num-batched-tokens", str(config.max_num_batched_tokens),
            "--gpu-memory-utilization", str(config.gpu_memory_utilization),
            "--async-scheduling" if config.async_scheduling else "--no-async-scheduling"]  # fmt: skip


def add_workload_arguments(parser: argparse.ArgumentParser, shapes: str) -> None:
    """The standard workload's and the engine's options, shared by the benchmarks that run it."""
    parser.add_argument("--shapes", default=shapes)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True, help="overlap the host's scheduling with the device's step")


def run_gateway(model_dir: Path, prompts: list[list[int]], vocab_size: int, args: argparse.Namespace, log_path: Path) -> tuple[dict, dict]:
    """The workload through `pagewire serve` on model_dir, after the same
    warm-up as in-process; then straight to its engine's Generate stream."""
    served = through_gateway.serve(model_dir, served_engine_flags(args), log_path)
    try:
        startup_seconds = served.wait_serving(through_gateway.START_TIMEOUT_S)
        through_gateway.stream_requests(served.grpc_target, warm_up_prompts(prompts, args, vocab_size), 8, prefix="warm")
        gateway = measure_served(served, served.grpc_target, prompts, args, direct_to_engine=False)
        # The engine's own Generate stream, on other prompts with the same
        # warm-up, so that its prefix cache hits match: the engine process
        # and gRPC without the gateway and the tokenizer.
        other_prompts = hf_peer.prompts(len(prompts), len(prompts[0]), vocab_size, seed=2)
        through_gateway.stream_requests(served.engine_target, warm_up_prompts(other_prompts, args, vocab_size), 8, prefix="warm", direct_to_engine=True)
        engine = measure_served(served, served.engine_target, other_prompts, args, direct_to_engine=True)
    finally:
        served.stop()
    return dict(startup_seconds=round(startup_seconds, 1), **gateway), engine


def measure_served(served: ServeProcess, target: str, prompts: list[list[int]], args: argparse.Namespace, direct_to_engine: bool) -> dict:
    """One run of the workload on a Generate stream of the served system,
    with the engine's counters and each service's CPU time over the run."""
    children = through_gateway.serve_children(served)
    stats_before, cpu_before = engine_stats(served.engine_target), through_gateway.cpu_seconds(children)
    timings = through_gateway.stream_requests(target, prompts, args.output_len, direct_to_engine=direct_to_engine)
    stats_after, cpu_after = engine_stats(served.engine_target), through_gateway.cpu_seconds(children)
    record = dict(streams=1,
                  **summarize(timings.start, timings.first_token, timings.finished, timings.output_tokens, timings.seconds, args.output_len),
                  messages=timings.messages, engine_steps=stats_after.steps_total - stats_before.steps_total,
                  num_kv_blocks=stats_after.num_total_blocks, preemptions=stats_after.num_preemptions - stats_before.num_preemptions,
                  prefix_cache_hit_tokens=stats_after.prefix_cache_hit_tokens - stats_before.prefix_cache_hit_tokens,
                  **{f"cpu_s_{name}": round(cpu_after[name] - cpu_before[name], 2) for name in cpu_after})  # fmt: skip
    if timings.errors:
        record.update(errors=len(timings.errors), first_error=timings.errors[0])
    return record


def benchmark_shape(shape: str, args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    workload = dict(shape=shape, requests=args.requests, prompt_len=args.prompt_len, output_len=args.output_len,
                    device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")  # fmt: skip
    prompts = hf_peer.prompts(args.requests, args.prompt_len, SHAPES[shape]["vocab_size"])
    config = engine_config(args)
    loaded = random_model(shape, resolve_dtype(config.dtype, device), config.max_model_len, device, args.quantization)
    setup_start = time.perf_counter()
    core = measured_engine(config, loaded)
    setup_seconds = time.perf_counter() - setup_start
    run_engine(core, warm_up_prompts(prompts, args, SHAPES[shape]["vocab_size"]), 8)
    if args.profile:
        profile_engine(core, hf_peer.prompts(args.requests, args.prompt_len, SHAPES[shape]["vocab_size"], seed=3), args, f"{args.profile}.{shape}")
    engine = run_engine(core, prompts, args.output_len)
    emit(dict(bench="throughput", system="pagewire", **workload, quantization=args.quantization, kv_cache_dtype=core.info.kv_cache_dtype,
              num_kv_blocks=core.kv_cache.num_blocks,
              setup_seconds=round(setup_seconds, 1), **engine))  # fmt: skip
    if args.gateway:
        work_dir = Path(tempfile.mkdtemp(prefix=f"pagewire-{shape}-", dir=args.work_dir or None))
        write_start = time.perf_counter()
        through_gateway.write_model_dir(loaded, work_dir / "model")
        through_gateway.write_tokenizer(loaded.config.vocab_size, work_dir / "model")
        write_seconds = time.perf_counter() - write_start
    del core, loaded
    free_gpu()

    if shape in hf_peer.SHAPES and not args.no_peer:
        run_peer(shape, prompts, workload, engine, args)
    if args.gateway:
        log_path = Path(args.log_dir or work_dir) / f"serve-{shape}.log"
        gateway, engine_grpc = run_gateway(work_dir / "model", prompts, SHAPES[shape]["vocab_size"], args, log_path)
        emit(dict(bench="throughput", system="pagewire-gateway", **workload, model_write_seconds=round(write_seconds, 1), **gateway))
        emit(dict(bench="throughput", system="pagewire-engine-grpc", **workload, **engine_grpc))
        emit(dict(bench="throughput_ratio", shape=shape, gateway_over_in_process=round(gateway["out_tok_s"] / engine["out_tok_s"], 3),
                  engine_grpc_over_in_process=round(engine_grpc["out_tok_s"] / engine["out_tok_s"], 3)))  # fmt: skip
        shutil.rmtree(work_dir, ignore_errors=True)


def profile_engine(core: EngineCore, prompts: list[list[int]], args: argparse.Namespace, path: str) -> None:
    """Where a full-size run's time goes, on prompts other than the measured
    ones (so the measured run's prefix cache hits are unchanged): torch
    operators and kernels (PATH.torch.txt, by device time and by host time)
    and the engine's Python functions (PATH.python.txt, cProfile by own time)."""
    import cProfile
    import pstats

    on_gpu = core.executor.loaded.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities) as profiler:
        run_engine(core, prompts, args.output_len)
    averages = profiler.key_averages()
    with open(f"{path}.torch.txt", "w") as out:
        out.write(averages.table(sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total", row_limit=40))
        out.write("\n\n")
        out.write(averages.table(sort_by="self_cpu_time_total", row_limit=40))
    # Fresh prompts again, so this run prefills as much as the first.
    rerun = hf_peer.prompts(len(prompts), len(prompts[0]), core.vocab_size, seed=4)
    python_profile = cProfile.Profile()
    python_profile.runcall(run_engine, core, rerun, args.output_len)
    with open(f"{path}.python.txt", "w") as out:
        pstats.Stats(python_profile, stream=out).sort_stats("tottime").print_stats(50)


def run_peer(shape: str, prompts: list[list[int]], workload: dict, engine: dict, args: argparse.Namespace) -> None:
    """HF `generate` at a static batch on the same prompts, and pagewire's ratio to it."""
    record = dict(bench="throughput", system="hf-generate", **workload, batch_size=args.peer_batch_size)
    try:
        model = hf_peer.build(shape, torch.bfloat16, "cuda", "sdpa")
        warm = warm_up_prompts(prompts, args, SHAPES[shape]["vocab_size"])
        hf_peer.run_static(model, warm[: args.peer_batch_size], 4, args.peer_batch_size, "cuda")
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
    add_workload_arguments(parser, "smollm2-135m,llama-1b,llama-8b")
    parser.add_argument("--peer-batch-size", type=int, default=64, help="HF generate's static batch size")
    add_fp8_arguments(parser)
    parser.add_argument("--profile", default="", help="profile a full-size run on other prompts: PATH.<shape>.torch.txt and PATH.<shape>.python.txt")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a cheap check of the benchmark itself")
    parser.add_argument("--no-peer", action="store_true", help="skip the HF generate peer")
    parser.add_argument("--gateway", action="store_true", help="also run the workload through `pagewire serve` and its public gRPC API")
    parser.add_argument("--work-dir", default="", help="where the model directory for --gateway is written (default: the system's temp dir)")
    parser.add_argument("--log-dir", default="", help="where `pagewire serve`'s log for --gateway goes (default: beside the model, deleted)")
    args = parser.parse_args()
    if args.gateway and (args.quantization, args.kv_cache_dtype) != ("none", "auto"):
        parser.error("--gateway writes a 16-bit checkpoint: run FP8 in-process only")
    configure_logging("warning")  # stdout carries only the JSON lines
    for shape in args.shapes.split(","):
        benchmark_shape(shape, args)


if __name__ == "__main__":
    main()
