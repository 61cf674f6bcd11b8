"""The standard workload through pagewire's public API: helpers for
benchmarks/throughput.py's `--gateway` mode.

The in-process model is written out as a HF directory (config.json +
safetensors, HF tensor names) with a word-level tokenizer whose vocabulary
covers every id, `pagewire serve` starts tokenizer, engine and gateway on it
as real processes on loopback ports, and a client sends the prompts as token
ids over one bidirectional `Generate` stream, as a real client multiplexes
its requests. The same client can talk to the served engine's own `Generate`
stream, which separates the engine process's cost from the gateway's.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from benchmarks.grpc_client import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, client_messages
from pagewire.v1 import common_pb2, engine_pb2, engine_pb2_grpc, gateway_pb2_grpc
from pagewire.services.engine.executor.loader import LoadedModel, dtype_name
from pagewire.services.engine.executor.models.llama import STACKED_PARAMS
from tests.support.harness import LOOPBACK, ServeProcess

# Room for the largest shape's checkpoint to load.
START_TIMEOUT_S = 480.0


@dataclass
class StreamTimings:
    """Client-side clock of one run: when it began, each request's first
    chunk with tokens and its last chunk, and the output tokens received."""

    start: float
    first_token: dict[str, float]
    finished: dict[str, float]
    output_tokens: int
    seconds: float
    errors: list[str]
    # Messages received (ServerMessages, or EngineSteps from the engine): how
    # finely the output arrives.
    messages: int


def write_model_dir(loaded: LoadedModel, directory: Path) -> None:
    """Save the engine's model as a HF checkpoint: its fused q/k/v and
    gate/up parameters are split back into HF's tensors."""
    from safetensors.torch import save_file

    model, config = loaded.model, loaded.config
    fused_parts: dict[str, list[tuple[str, int]]] = {}
    for part, fused, index in STACKED_PARAMS:
        fused_parts.setdefault(fused, []).append((part, index))
    tensors = {}
    # state_dict, not the parameters: the CPU runner's prepacked projections keep their values only there.
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        fused = next((f for f in fused_parts if f".{f}." in name), None)
        if fused is None:
            tensors[name] = param.detach().cpu()
            continue
        pieces = param.detach().split(model._part_sizes(name, param.shape[0]))
        for part, index in fused_parts[fused]:
            tensors[name.replace(fused, part)] = pieces[index].cpu().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.qkv_bias,
        "torch_dtype": dtype_name(loaded.dtype),
    }
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))


def write_tokenizer(vocab_size: int, directory: Path) -> None:
    """A word-level tokenizer with one word per id ("<unk>" for 0, "w<id>"
    otherwise), so that every id the model can emit detokenizes; saved as
    tokenizer.json + tokenizer_config.json for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0} | {f"w{i}": i for i in range(1, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(str(directory))


def serve(model_dir: Path, engine_flags: list[str], log_path: Path) -> ServeProcess:
    """`pagewire serve` on a model directory, started; its output goes to log_path."""
    served = ServeProcess(
        ["--host", LOOPBACK, "--model", str(model_dir), *engine_flags, "--max-message-bytes", str(MAX_MESSAGE_BYTES)],
        log_path=log_path,
    )
    served.start()
    return served


def serve_children(served: ServeProcess) -> dict[str, int]:
    """The pid of each service `pagewire serve` runs, by name."""
    return {record["child"]: record["pid"] for record in served.events("started")}


def cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU time (user + system) each service has used so far, with its live
    descendants' (the engine's core process, grammar, gateway and tokenizer
    workers): where the host's work goes."""
    return {name: _tree_cpu_seconds(psutil.Process(pid)) for name, pid in pids.items()}


def _tree_cpu_seconds(root: psutil.Process) -> float:
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue  # it exited meanwhile
        total += times.user + times.system
    return total


async def _stream(target: str, prompts: list[list[int]], output_len: int, prefix: str, direct_to_engine: bool, token_ids_only: bool) -> StreamTimings:
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [f"{prefix}{index}" for index in range(len(prompts))]
    if direct_to_engine:
        inputs: list = [engine_pb2.EngineInput(add=[engine_pb2.AddRequest(request_id=i, prompt_token_ids=p, sampling=sampling)]) for i, p in zip(ids, prompts)]
    else:
        inputs = client_messages(ids, prompts, output_len, token_ids_only)
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        await channel.channel_ready()
        first_token: dict[str, float] = {}
        finished: dict[str, float] = {}
        errors: list[str] = []
        output_tokens = messages = 0
        start = time.perf_counter()
        # Every request starts at once; the client half-closes after the last.
        if direct_to_engine:
            replies = engine_pb2_grpc.EngineStub(channel).Generate(iter(inputs))
        else:
            replies = gateway_pb2_grpc.GenerationStub(channel).Generate(iter(inputs))
        async for reply in replies:
            now = time.perf_counter()
            messages += 1
            for chunk in reply.updates if direct_to_engine else reply.chunks:
                if chunk.token_ids:
                    output_tokens += len(chunk.token_ids)
                    first_token.setdefault(chunk.request_id, now)
                if chunk.error.code:
                    errors.append(f"{chunk.request_id}: {chunk.error.message}")
                if chunk.finish_reason:
                    finished[chunk.request_id] = now
        seconds = time.perf_counter() - start
    return StreamTimings(start, first_token, finished, output_tokens, seconds, errors, messages)


def stream_requests(
    target: str, prompts: list[list[int]], output_len: int, prefix: str = "r", direct_to_engine: bool = False, token_ids_only: bool = False
) -> StreamTimings:
    """Send every prompt as token ids on one Generate stream (the gateway's,
    or with direct_to_engine the engine's own) and time the replies; with
    token_ids_only the gateway's replies carry ids without text."""
    return asyncio.run(_stream(target, prompts, output_len, prefix, direct_to_engine, token_ids_only))
