"""Engine service settings. Plain data with no torch or gRPC imports, so the
CLI can build `--help` cheaply and the engine core can take it directly."""

from __future__ import annotations

from dataclasses import dataclass

from pagewire.services.common.config import ServiceConfig, available_cores, option

CPU_MAX_NUM_BATCHED_TOKENS = 2048
GPU_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
MAX_DEFAULT_GRAMMAR_WORKERS = 8
# Hosts with fewer cores fill the grammar masks in the step thread by default:
# a worker would take its core from the forward pass.
MIN_CORES_FOR_GRAMMAR_WORKERS = 4


@dataclass
class EngineConfig(ServiceConfig):
    """Run the engine service: continuous batching with chunked prefill and paged attention over token ids."""

    port: int = option(50053, "Port to bind.")
    model: str = option("", "A HF model directory or a .gguf file; empty for the embedded SmolLM2-135M-Instruct.")
    device: str = option("auto", "Where the model runs; auto picks cuda when available.", choices=["auto", "cpu", "cuda"])
    dtype: str = option(
        "auto", "Compute and KV cache dtype; auto is float32 on the CPU and bfloat16 on a GPU.", choices=["auto", "float32", "bfloat16", "float16"]
    )
    max_model_len: int | None = option(None, "Longest sequence (prompt + output) in tokens; unset: the model's context length.")
    block_size: int = option(16, "Tokens per KV cache block, a power of two.")
    max_num_seqs: int = option(256, "Most sequences in one step.")
    max_queue_len: int = option(
        1024, "Most requests queued behind a full running batch (--max-num-seqs); past it new ones are refused with RESOURCE_EXHAUSTED (HTTP 429) instead of piling up."
    )
    max_num_batched_tokens: int | None = option(
        None, f"Token budget of one step (prefill chunks + decodes); unset: {CPU_MAX_NUM_BATCHED_TOKENS} on the CPU, {GPU_MAX_NUM_BATCHED_TOKENS} on a GPU."
    )
    enable_prefix_caching: bool = option(True, "Share the KV blocks of identical prompt prefixes between requests.")
    kv_cache_memory: int = option(DEFAULT_CPU_KV_CACHE_BYTES, "Bytes of KV cache on the CPU.")
    gpu_memory_utilization: float = option(0.9, "Fraction of GPU memory for weights, activations and KV cache.")
    num_kv_blocks: int | None = option(None, "Fixed number of KV blocks, overriding the memory-based sizing.")
    quantization: str = option(
        "auto",
        "Weight format of the decoder layers' projections: fp8 quantizes a 16/32-bit checkpoint at load to FP8 E4M3 with one scale per "
        "output channel and scales activations per token (FP8 tensor cores on sm_89+, dequantized elsewhere); auto keeps the checkpoint's "
        "own format (published FP8 checkpoints run in FP8); none dequantizes an FP8 checkpoint. Embeddings, norms and lm_head stay unquantized.",
        choices=["auto", "fp8", "none"],
    )
    kv_cache_dtype: str = option(
        "auto",
        "KV cache element type: auto is the compute dtype; fp8 stores K and V as FP8 E4M3 with one scale per layer (the checkpoint's "
        "k_scale/v_scale, else 1.0 with values clamped to +-448), so twice the blocks fit in the same memory.",
        choices=["auto", "fp8"],
    )
    async_scheduling: bool = option(
        True, "Schedule step N+1 on the host while the device runs step N; sampled ids reach the next step on the device."
    )
    cuda_graphs: bool = option(
        True,
        "On a GPU, replay CUDA graphs for decode and verify steps and for the forward pass of the other steps; "
        "--no-cuda-graphs launches every kernel from Python (slower, less memory held, for comparing the two).",
    )
    tensor_parallel_size: int = option(
        1,
        "Ranks the model is split over (one per GPU, or processes on the CPU): heads by KV group, the MLP and the vocabulary; "
        "this process is rank 0 and starts a worker process for each other rank.",
    )
    lora: list[str] = option(
        [],
        "A PEFT LoRA adapter to serve, as NAME=PATH (a directory with adapter_config.json and adapter_model.safetensors); repeatable. "
        "Requests pick one by name (the REST model field, the gRPC lora field). Implies --enable-lora.",
    )
    enable_lora: bool = option(
        False, "Give the model's projections LoRA slots, so adapters can be loaded at run time (LoadLoraAdapter) even when none is given at start."
    )
    max_loras: int = option(4, "Adapters resident on the device at once (one step mixes at most this many); the others wait in host memory.")
    max_lora_rank: int = option(64, "Largest adapter rank accepted; every slot is padded to it, so keep it as low as the adapters allow.")
    lora_kernel: str = option(
        "auto",
        "How a GPU applies the adapters: dense multiplies every token by every slot's A and B on the tensor cores and masks out the "
        "other slots (the cost grows with --max-loras x --max-lora-rank); gathered reads each token's own slot on the CUDA cores; "
        "auto picks dense while the slots' columns are few (see services/engine/executor/layers/lora.py).",
        choices=["auto", "dense", "gathered"],
    )
    grammar_workers: int | None = option(
        None,
        "Processes that hold the structured-output matchers and fill a step's masks while the step thread goes on; 0 fills them in "
        f"the step thread. Unset: half the cores, at most {MAX_DEFAULT_GRAMMAR_WORKERS}, on hosts of {MIN_CORES_FOR_GRAMMAR_WORKERS} "
        "cores or more, else 0.",
    )
    seed: int = option(0, "Seed of the random generator shared by requests that give no seed of their own.")
    speculative_method: str = option(
        "none",
        "Speculative decoding: ngram proposes up to --num-speculative-tokens tokens by prompt lookup (the newest earlier occurrence of "
        "the last --ngram-max..--ngram-min tokens); draft has --draft-model decode them greedily; one target pass verifies them; "
        "none decodes one token per step.",
        choices=["none", "ngram", "draft"],
    )
    draft_model: str = option(
        "", "With --speculative-method draft: a smaller model with the target's tokenizer (HF directory or .gguf), run in this engine."
    )
    num_speculative_tokens: int = option(4, "Most tokens proposed per sequence and step (k); the verify pass computes k + 1 positions.")
    ngram_max: int = option(4, "Longest suffix (in tokens) that prompt lookup tries to match first.")
    ngram_min: int = option(2, "Shortest suffix that prompt lookup accepts as a match.")


def token_budget(config: EngineConfig, on_gpu: bool) -> int:
    """--max-num-batched-tokens, or its default for the device."""
    return config.max_num_batched_tokens or (GPU_MAX_NUM_BATCHED_TOKENS if on_gpu else CPU_MAX_NUM_BATCHED_TOKENS)


def grammar_workers(config: EngineConfig) -> int:
    """--grammar-workers, or its default for this host's cores."""
    if config.grammar_workers is not None:
        if config.grammar_workers < 0:
            raise ValueError(f"--grammar-workers must be 0 or more, got {config.grammar_workers}")
        return config.grammar_workers
    cores = available_cores()
    return min(MAX_DEFAULT_GRAMMAR_WORKERS, cores // 2) if cores >= MIN_CORES_FOR_GRAMMAR_WORKERS else 0
