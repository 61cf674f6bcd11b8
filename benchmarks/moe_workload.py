"""The standard workload on a mixture-of-experts model: a Qwen3-30B-A3B
shape (48 layers, hidden 2048, 32 query and 4 KV heads of 128, 128 experts
of width 768 with 8 taken per token, vocabulary 151936) with random bf16
weights on the GPU. pagewire's engine in-process, then HF transformers'
`generate` (Qwen3MoeForCausalLM, static batches of --peer-batch-size) on
the same shape in the same call; the two models never share the device.
Warm-ups use prompts of their own (no prefix-cache hits; the record says so).
Prints one JSON line per system, then the ratio.

    python -m benchmarks.moe_workload [--requests 256] [--prompt-len 512] [--output-len 128] [--peer-batch-size 64]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import hf_peer
from benchmarks.throughput import build_random, emit, free_gpu, measured_engine, run_engine
from pagewire.services.common.logging import configure_logging
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.executor.loader import LoadedModel
from pagewire.services.engine.executor.models.llama import ModelConfig

QWEN3_30B_A3B = dict(
    hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, vocab_size=151936, rope_theta=1000000.0, norm_topk_prob=True,
)  # fmt: skip


def pagewire_model(max_model_len: int) -> LoadedModel:
    s = QWEN3_30B_A3B
    config = ModelConfig(
        architecture="qwen3_moe", vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_layers=s["num_hidden_layers"], num_heads=s["num_attention_heads"], num_kv_heads=s["num_key_value_heads"], head_dim=s["head_dim"],
        rms_norm_eps=1e-6, rope_theta=s["rope_theta"], max_position_embeddings=max_model_len, tie_word_embeddings=False, qkv_bias=False,
        eos_token_ids=(), qk_norm=True, num_experts=s["num_experts"], num_experts_per_tok=s["num_experts_per_tok"],
        moe_intermediate_size=s["moe_intermediate_size"], norm_topk_prob=s["norm_topk_prob"],
    )  # fmt: skip
    device = torch.device("cuda")
    return LoadedModel(build_random(config, torch.bfloat16, max_model_len, device), config, "random-qwen3-30b-a3b", device, torch.bfloat16)


def run_hf(args: argparse.Namespace, measured: list[list[int]], warm_up: list[list[int]]) -> dict:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**QWEN3_30B_A3B, max_position_embeddings=8192, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    hf_peer.run_static(model, warm_up, 8, args.peer_batch_size, "cuda")
    seconds, tokens = hf_peer.run_static(model, measured, args.output_len, args.peer_batch_size, "cuda")
    return dict(seconds=round(seconds, 3), output_tokens=tokens, out_tok_s=round(tokens / seconds, 1), batch_size=args.peer_batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--peer-batch-size", type=int, default=64)
    args = parser.parse_args()
    configure_logging("warning")
    vocab = QWEN3_30B_A3B["vocab_size"]
    measured = hf_peer.prompts(args.requests, args.prompt_len, vocab, seed=1)
    warm_up = hf_peer.prompts(min(args.requests, args.peer_batch_size), args.prompt_len, vocab, seed=2)
    workload = dict(bench="moe_workload", shape="qwen3-30b-a3b", requests=args.requests, prompt_len=args.prompt_len,
                    output_len=args.output_len, device=torch.cuda.get_device_name())  # fmt: skip
    max_model_len = args.prompt_len + args.output_len
    config = EngineConfig(device="cuda", dtype="bfloat16", max_model_len=max_model_len, max_num_seqs=256, gpu_memory_utilization=0.85)
    core = measured_engine(config, pagewire_model(max_model_len))
    run_engine(core, warm_up, 8)
    pagewire = run_engine(core, measured, args.output_len)
    emit(dict(workload, system="pagewire", num_kv_blocks=core.info.num_kv_blocks, **pagewire))
    del core
    free_gpu()
    hf = run_hf(args, measured, warm_up)
    emit(dict(workload, system="hf-generate", **hf))
    emit(dict(bench="moe_workload_ratio", pagewire_over_hf_generate=round(pagewire["out_tok_s"] / hf["out_tok_s"], 2)))


if __name__ == "__main__":
    main()
