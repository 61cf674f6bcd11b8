"""The model executor: loads the model onto its device, sizes and allocates
the KV cache, and runs the core's scheduled batches through a runner (CUDA
graphs on a GPU, eager on the CPU) and the sampler. Everything the engine
does with torch and the device goes through here."""

from __future__ import annotations

import dataclasses
import gc

import torch

from pagewire.services.common.errors import Refusal, RequestError
from pagewire.services.common.model import resolve_model
from pagewire.services.engine.config import EngineConfig, grammar_workers, token_budget
from pagewire.services.engine.core.engine import EngineCore, ExecutorSpec
from pagewire.services.engine.core.scheduler import ScheduledSequence
from pagewire.services.engine.executor.cuda_graphs import CudaGraphRunner
from pagewire.services.engine.executor.draft import DraftProposer, draft_bytes_per_block, load_draft_model
from pagewire.services.engine.executor.grammar_pool import GrammarMatchers
from pagewire.services.engine.executor.kv_tensors import allocate_kv_tensors, kv_bytes_per_block
from pagewire.services.engine.executor.layers.fp8 import FP8_DTYPE
from pagewire.services.engine.executor.lora import LoraSlots
from pagewire.services.engine.executor.lora_adapter import LoraAdapter, read_adapter
from pagewire.services.engine.executor.loader import LoadedModel, dtype_name, load_model, read_model_config, resolve_device, resolve_dtype
from pagewire.services.engine.executor.parallel import check_splittable, gather_objects, weight_bytes
from pagewire.services.engine.executor.runner import LaunchedStep, ModelRunner, profile_peak_memory
from pagewire.services.engine.executor.sampler import Sampler
from pagewire.services.engine.executor.tensor_parallel import BroadcastingSampler, ReceivingSampler, TensorParallelWorkers

SIZED_SETTINGS = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_blocks")


def load_engine_model(config: EngineConfig) -> LoadedModel:
    device = resolve_device(config.device)
    return load_model(
        resolve_model(config.model), device, resolve_dtype(config.dtype, device), config.max_model_len, quantization=config.quantization
    )


def make_runner(
    config: EngineConfig,
    loaded: LoadedModel,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    sampler: Sampler | BroadcastingSampler | ReceivingSampler,
    max_model_len: int,
    lora: LoraSlots | None = None,
    *,
    verifies: bool = True,
) -> ModelRunner:
    """CUDA graphs on a GPU for decode steps, for verify steps when the
    runner `verifies` speculative proposals (the target model's, not the
    draft's), and for the forward pass of the other steps up to the token
    budget (unless --no-cuda-graphs); eager steps on the CPU over
    oneDNN-prepacked projections; the same on every tensor-parallel rank.
    Over several ranks the forward-pass graphs are left out: their
    collectives inside graphs are not yet verified on several GPUs."""
    if loaded.device.type == "cuda" and config.cuda_graphs:
        verify_tokens = 1 + config.num_speculative_tokens if verifies and config.speculative_method else 1
        forward_graph_tokens = token_budget(config, on_gpu=True) if config.tensor_parallel_size == 1 else 0
        return CudaGraphRunner(
            loaded, kv_caches, config.block_size, sampler, config.max_num_seqs, max_model_len, lora, verify_tokens, forward_graph_tokens
        )
    if loaded.device.type == "cpu":
        loaded.model.prepack_for_cpu()
    return ModelRunner(loaded, kv_caches, config.block_size, sampler, lora)


def lora_flag(value: str) -> tuple[str, str]:
    """--lora NAME=PATH as (name, path)."""
    name, separator, path = value.partition("=")
    if not separator or not name.strip() or not path.strip():
        raise ValueError(f"--lora takes NAME=PATH (an adapter name and its directory), got {value!r}")
    return name.strip(), path.strip()


def attach_lora(config: EngineConfig, loaded: LoadedModel) -> LoraSlots | None:
    """With --enable-lora or any --lora: the model's LoRA slots, holding the
    adapters given at start; None otherwise."""
    if not (config.enable_lora or config.lora):
        return None
    if config.max_loras < 1 or config.max_lora_rank < 1:
        raise ValueError(f"--max-loras and --max-lora-rank must be at least 1, got {config.max_loras} and {config.max_lora_rank}")
    if config.tensor_parallel_size > 1:
        raise ValueError("LoRA adapters (--lora, --enable-lora) are not supported with --tensor-parallel-size above 1: serve them on one device")
    slots = LoraSlots(loaded.model, config.max_loras, config.max_lora_rank, loaded.dtype, loaded.device, config.lora_kernel)
    for value in config.lora:
        name, path = lora_flag(value)
        slots.add(slots.prepare(read_adapter(name, path, config.max_lora_rank, loaded.dtype)))
    return slots


def start_tensor_parallel(config: EngineConfig, loaded: LoadedModel | None) -> TensorParallelWorkers | None:
    """With --tensor-parallel-size above 1, the worker processes of the other
    ranks, joined with this process as rank 0; None on one device."""
    size = config.tensor_parallel_size
    if size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {size}")
    if size == 1:
        return None
    if loaded is not None:
        raise ValueError("a model loaded beforehand cannot be split over tensor-parallel ranks; let the executor load it")
    check_splittable(read_model_config(resolve_model(config.model)), size)
    return TensorParallelWorkers(config, resolve_device(config.device))


def kv_cache_dtype(config: EngineConfig, loaded: LoadedModel) -> torch.dtype:
    """--kv-cache-dtype: fp8 (E4M3, one byte an element) or the compute dtype."""
    if config.kv_cache_dtype not in ("auto", "fp8"):
        raise ValueError(f"--kv-cache-dtype must be auto or fp8, got {config.kv_cache_dtype!r}")
    return FP8_DTYPE if config.kv_cache_dtype == "fp8" else loaded.dtype


class ModelExecutor:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        for name in SIZED_SETTINGS:
            value = getattr(config, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if config.block_size & (config.block_size - 1):
            # The GPU attention kernel finds a token's slot with shifts and masks.
            raise ValueError(f"--block-size must be a power of two, got {config.block_size}")
        on_gpu = (loaded.device if loaded is not None else resolve_device(config.device)).type == "cuda"
        self.grammars = GrammarMatchers(config.model, config.max_num_seqs, grammar_workers(config), config.log_level, config.log_format, pin_memory=on_gpu)
        self.workers = start_tensor_parallel(config, loaded)
        try:
            self._build(config, loaded or load_engine_model(config))
        except BaseException:
            self.close()
            raise

    def _build(self, config: EngineConfig, loaded: LoadedModel) -> None:
        model_config = loaded.config
        self.loaded = loaded
        self.draft = self._load_draft(config, loaded)
        self.kv_dtype = kv_cache_dtype(config, loaded)
        self.max_lora_rank = config.max_lora_rank
        # Before the KV cache is sized, so that it leaves room for the slots.
        self.lora = attach_lora(config, loaded)
        max_model_len = config.max_model_len or model_config.max_position_embeddings
        rope_positions = loaded.model.model.rotary.max_positions
        if max_model_len > rope_positions:
            raise ValueError(f"max_model_len {max_model_len} exceeds the {rope_positions} positions the model was loaded for")
        on_gpu = loaded.device.type == "cuda"
        max_num_batched_tokens = token_budget(config, on_gpu)
        num_blocks = config.num_kv_blocks or self._blocks_for_memory(config, min(max_num_batched_tokens, max_model_len))
        if num_blocks < 1:
            raise ValueError("no memory is left for the KV cache: raise --kv-cache-memory / --gpu-memory-utilization or set --num-kv-blocks")
        if self.workers is not None:
            self.workers.share((num_blocks, max_model_len))
        self.draft_proposer = self._draft_proposer(config, num_blocks, max_num_batched_tokens, max_model_len) if self.draft else None
        self.spec = ExecutorSpec(
            model_id=loaded.model_id,
            vocab_size=model_config.vocab_size,
            eos_token_ids=tuple(sorted(set(model_config.eos_token_ids))),
            max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens,
            num_kv_blocks=num_blocks,
            device=str(loaded.device),
            dtype=dtype_name(loaded.dtype),
            sliding_window=model_config.sliding_window,
            kv_cache_dtype="fp8" if self.kv_dtype == FP8_DTYPE else dtype_name(self.kv_dtype),
            quantization=model_config.quantization,
            max_loras=self.lora.max_loras if self.lora is not None else 0,
            lora_adapters=tuple(self.lora.adapters) if self.lora is not None else (),
        )
        kv_caches = allocate_kv_tensors(
            model_config.num_layers, num_blocks, config.block_size, model_config.num_kv_heads, model_config.head_dim, self.kv_dtype, loaded.device
        )
        self.sampler = Sampler(config.seed, loaded.device, self.grammars)
        sampler = self.sampler if self.workers is None else BroadcastingSampler(self.sampler)
        self.runner = make_runner(config, loaded, kv_caches, sampler, max_model_len, self.lora)
        shards = gather_objects(weight_bytes(loaded.model)) if self.workers is not None else [weight_bytes(loaded.model)]
        self.spec = dataclasses.replace(self.spec, weight_bytes_per_rank=tuple(shards))

    def _load_draft(self, config: EngineConfig, loaded: LoadedModel) -> LoadedModel | None:
        """The draft model of --speculative-method draft, loaded before the KV
        cache is sized so that its weights count against the device's memory."""
        if config.speculative_method != "draft":
            return None
        if not config.draft_model:
            raise ValueError("--speculative-method draft needs --draft-model PATH")
        if self.workers is not None:
            raise ValueError("--speculative-method draft does not run with --tensor-parallel-size above 1 yet")
        return load_draft_model(config.draft_model, loaded, config.max_model_len or loaded.config.max_position_embeddings)

    def _draft_proposer(self, config: EngineConfig, num_blocks: int, max_num_batched_tokens: int, max_model_len: int) -> DraftProposer:
        """The draft's KV cache has as many blocks as the target's: a request
        never needs more draft blocks than target blocks plus its proposals."""
        assert self.draft is not None
        c = self.draft.config
        kv_caches = allocate_kv_tensors(c.num_layers, num_blocks, config.block_size, c.num_kv_heads, c.head_dim, self.kv_dtype, self.draft.device)
        # Greedy passes: the draft's own sampler, with no request seeds to keep.
        runner = make_runner(config, self.draft, kv_caches, Sampler(0, self.draft.device), max_model_len, verifies=False)
        return DraftProposer(runner, num_blocks, config.block_size, config.num_speculative_tokens, max_num_batched_tokens)

    def _blocks_for_memory(self, config: EngineConfig, profiled_tokens: int) -> int:
        c, loaded = self.loaded.config, self.loaded
        per_block = kv_bytes_per_block(c.num_layers, config.block_size, c.num_kv_heads, c.head_dim, self.kv_dtype)
        if self.draft is not None:
            per_block += draft_bytes_per_block(self.draft, config.block_size, self.kv_dtype)
        if loaded.device.type != "cuda":
            return config.kv_cache_memory // per_block
        total = torch.cuda.get_device_properties(loaded.device).total_memory
        peak = profile_peak_memory(loaded, profiled_tokens, config.block_size)
        return int(total * config.gpu_memory_utilization - peak) // per_block

    def launch(self, scheduled: list[ScheduledSequence]) -> LaunchedStep | None:
        if self.workers is not None:
            # The ranks take the last step's sampled ids before this step's
            # plan: on a CPU both travel over the one gloo group, in order.
            if self.runner.last_launched is not None:
                self.runner.last_launched.complete()
            self.workers.send(scheduled)
        return self.runner.launch(scheduled)

    def close(self) -> None:
        """Stop the tensor-parallel workers and the grammar workers, if any."""
        if self.workers is not None:
            self.workers.stop()
        self.grammars.close()

    def read_lora(self, name: str, path: str) -> LoraAdapter:
        """Read an adapter into host memory, ready to add (RequestError when it
        cannot be served); any thread may call it, as it touches no slot."""
        if self.lora is None:
            raise RequestError(Refusal.FAILED_PRECONDITION, "this engine has no LoRA slots: start it with --enable-lora (or --lora NAME=PATH)")
        return self.lora.prepare(read_adapter(name, path, self.max_lora_rank, self.loaded.dtype))

    def add_lora(self, adapter: LoraAdapter) -> None:
        """Serve a read adapter; it reaches a device slot with the first step that uses it."""
        assert self.lora is not None
        self.lora.add(adapter)

    def unload_lora(self, name: str) -> None:
        if self.lora is not None:
            self.lora.remove(name)

    def forget(self, request_id: str) -> None:
        self.sampler.forget(request_id)
        if self.draft_proposer is not None:
            self.draft_proposer.forget(request_id)
        self.grammars.forget(request_id)

    def constrain(self, request_id: str, compiled_grammar: str, stop_token_ids: tuple[int, ...]) -> None:
        self.grammars.add(request_id, compiled_grammar, stop_token_ids)


def freeze_long_lived_objects() -> None:
    """Take every object alive now out of the cyclic garbage collector's
    reach; called once an engine is built in a process that keeps it. The
    block pool holds a Python object per KV block (hundreds of thousands on
    a large GPU), and a full collection walks each one: on an H200 one took
    0.3 s, a stall of every request in the middle of a step. Frozen objects
    are still freed when their last reference goes; only a reference cycle
    among them would stay (gc.unfreeze() hands them back)."""
    gc.collect()
    gc.freeze()


def create_engine_core(config: EngineConfig, loaded: LoadedModel | None = None) -> EngineCore:
    """An EngineCore over a ModelExecutor: the model of `config` (or `loaded`) on its device."""
    return EngineCore(config, ModelExecutor(config, loaded))
