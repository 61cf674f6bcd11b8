"""Multi-LoRA throughput on the standard workload: the base model alone,
then the same engine settings with --adapters random PEFT adapters of rank
--rank (every projection targeted) spread evenly over the requests, one
adapter per request in turn, --max-loras of them resident at once (all, by
default). Prints one JSON line per run and the ratio of LoRA to base output
throughput (the goal on an H200: llama-8b, 8 adapters of rank 16, >= 0.8).

    python -m benchmarks.lora [--shapes llama-8b] [--adapters 8] [--rank 16]

A cheap check of the benchmark itself on a CPU:

    python -m benchmarks.lora --device cpu --shapes tiny --requests 16 --prompt-len 64 --output-len 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks import hf_peer
from benchmarks.throughput import SHAPES, add_workload_arguments, emit, engine_config, free_gpu, measured_engine, random_model, run_engine, warm_up_prompts
from pagewire.services.common.logging import configure_logging
from pagewire.services.engine.executor.loader import resolve_dtype
from pagewire.services.engine.executor.lora_adapter import TARGET_MODULES

# Standard deviation of the random adapter weights: B @ A stays a small change of each projection.
ADAPTER_STD = 0.02


def write_adapter(directory: Path, shape: str, rank: int, seed: int) -> Path:
    """A PEFT LoRA adapter of every projection of `shape`, random A and B."""
    spec = SHAPES[shape]
    hidden, heads, kv_heads, head_dim = spec["hidden_size"], spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"]
    sizes = {  # (in, out) of each target
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim), "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, spec["intermediate_size"]),
        "up_proj": (hidden, spec["intermediate_size"]), "down_proj": (spec["intermediate_size"], hidden),
    }  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec["num_hidden_layers"]):
        for target in TARGET_MODULES:
            block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            fan_in, fan_out = sizes[target]
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator).mul_(ADAPTER_STD).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator).mul_(ADAPTER_STD).to(torch.bfloat16)
    directory.mkdir(parents=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGET_MODULES), "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def benchmark_shape(shape: str, args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    workload = dict(shape=shape, requests=args.requests, prompt_len=args.prompt_len, output_len=args.output_len,
                    device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")  # fmt: skip
    vocab_size = SHAPES[shape]["vocab_size"]
    prompts = hf_peer.prompts(args.requests, args.prompt_len, vocab_size)
    base_config = engine_config(args)
    dtype = resolve_dtype(base_config.dtype, device)
    core = measured_engine(base_config, random_model(shape, dtype, base_config.max_model_len, device))
    run_engine(core, warm_up_prompts(prompts, args, vocab_size), 8)
    base = run_engine(core, prompts, args.output_len)
    emit(dict(bench="lora", system="pagewire-base", **workload, num_kv_blocks=core.kv_cache.num_blocks, **base))
    del core
    free_gpu()

    with tempfile.TemporaryDirectory(prefix="pagewire-lora-") as work_dir:
        write_start = time.perf_counter()
        names = [f"adapter-{i}" for i in range(args.adapters)]
        flags = [f"{name}={write_adapter(Path(work_dir) / name, shape, args.rank, seed=i)}" for i, name in enumerate(names)]
        write_seconds = time.perf_counter() - write_start
        for kernel in args.lora_kernels.split(","):
            config = dataclasses.replace(base_config, lora=flags, max_loras=args.max_loras or args.adapters, max_lora_rank=args.rank, lora_kernel=kernel)
            # A fresh model: a LoRA engine wraps its model's projections in place.
            core = measured_engine(config, random_model(shape, dtype, base_config.max_model_len, device))
            run_engine(core, warm_up_prompts(prompts, args, vocab_size), 8, names)
            lora = run_engine(core, prompts, args.output_len, names)
            resolved = core.executor.lora.context.kernel
            emit(dict(bench="lora", system="pagewire-lora", **workload, adapters=args.adapters, rank=args.rank, max_loras=config.max_loras,
                      lora_kernel=kernel, resolved_kernel=resolved, adapter_write_seconds=round(write_seconds, 1),
                      num_kv_blocks=core.kv_cache.num_blocks, **lora))  # fmt: skip
            emit(dict(bench="lora_ratio", shape=shape, lora_kernel=resolved, lora_over_base=round(lora["out_tok_s"] / base["out_tok_s"], 3)))
            del core
            free_gpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, "llama-8b")
    parser.add_argument("--adapters", type=int, default=8, help="adapters, spread evenly over the requests")
    parser.add_argument("--rank", type=int, default=16, help="every adapter's rank (and --max-lora-rank)")
    parser.add_argument("--max-loras", type=int, default=0, help="adapter slots on the device; 0: as many as --adapters")
    parser.add_argument("--lora-kernels", default="auto", help="comma-separated --lora-kernel values, one LoRA run each")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a cheap check of the benchmark itself")
    args = parser.parse_args()
    configure_logging("warning", "console", service="benchmark")
    for shape in args.shapes.split(","):
        benchmark_shape(shape, args)


if __name__ == "__main__":
    main()
