"""EngineCore: the engine without transport. Requests come in as token ids,
each `step()` runs one scheduled batch and reports what every request did."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import torch

from services.common.grpc_utils import RequestError, invalid_argument
from services.common.logging import get_logger
from services.common.model import resolve_model
from services.engine.config import CPU_MAX_NUM_BATCHED_TOKENS, GPU_MAX_NUM_BATCHED_TOKENS, EngineConfig
from services.engine.cuda_graphs import CudaGraphRunner
from services.engine.kv_cache import KVCacheManager, allocate_kv_tensors, cdiv, kv_bytes_per_block
from services.engine.loader import LoadedModel, dtype_name, load_model, resolve_device, resolve_dtype
from services.engine.runner import ModelRunner, profile_peak_memory
from services.engine.sampler import Sampler
from services.engine.scheduler import Scheduler
from services.engine.sequence import FinishReason, RequestOutput, SamplingParams, Sequence

log = get_logger("engine")


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: str
    prefix_caching: bool


@dataclass(frozen=True)
class EngineLoad:
    num_running: int
    num_waiting: int
    kv_cache_usage: float


@dataclass(frozen=True)
class EngineStats:
    load: EngineLoad
    num_total_blocks: int
    num_free_blocks: int
    num_cached_free_blocks: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    requests_finished_total: int
    steps_total: int


def load_engine_model(config: EngineConfig) -> LoadedModel:
    device = resolve_device(config.device)
    return load_model(resolve_model(config.model), device, resolve_dtype(config.dtype, device), config.max_model_len)


class EngineCore:
    """Not thread-safe: one thread owns it (the servicer's step loop)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_blocks"):
            value = getattr(config, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        loaded = loaded or load_engine_model(config)
        model_config = loaded.config
        self.loaded = loaded
        self.block_size = config.block_size
        self.vocab_size = model_config.vocab_size
        self.eos_token_ids = frozenset(model_config.eos_token_ids)
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        rope_positions = loaded.model.model.rotary.max_positions
        if self.max_model_len > rope_positions:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the {rope_positions} positions the model was loaded for")
        on_gpu = loaded.device.type == "cuda"
        self.max_num_batched_tokens = config.max_num_batched_tokens or (GPU_MAX_NUM_BATCHED_TOKENS if on_gpu else CPU_MAX_NUM_BATCHED_TOKENS)
        self.max_num_seqs = config.max_num_seqs
        self.max_queue_len = config.max_queue_len
        num_blocks = config.num_kv_blocks or self._blocks_for_memory(config)
        if num_blocks < 1:
            raise ValueError("no memory is left for the KV cache: raise --kv-cache-memory / --gpu-memory-utilization or set --num-kv-blocks")
        kv_caches = allocate_kv_tensors(
            model_config.num_layers, num_blocks, self.block_size, model_config.num_kv_heads, model_config.head_dim, loaded.dtype, loaded.device
        )
        self.kv_cache = KVCacheManager(num_blocks, self.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, self.max_num_batched_tokens)
        self.sampler = Sampler(config.seed, loaded.device)
        runner_args = (loaded, kv_caches, self.block_size, self.sampler)
        self.runner = CudaGraphRunner(*runner_args, self.max_num_seqs, self.max_model_len) if on_gpu else ModelRunner(*runner_args)
        self.sequences: dict[str, Sequence] = {}
        self._finished_outside_step: list[RequestOutput] = []
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_finished_total = 0
        self.steps_total = 0
        log.info("engine ready", num_kv_blocks=num_blocks, block_size=self.block_size, max_model_len=self.max_model_len)

    def _blocks_for_memory(self, config: EngineConfig) -> int:
        c, loaded = self.loaded.config, self.loaded
        per_block = kv_bytes_per_block(c.num_layers, self.block_size, c.num_kv_heads, c.head_dim, loaded.dtype)
        if loaded.device.type != "cuda":
            return config.kv_cache_memory // per_block
        total = torch.cuda.get_device_properties(loaded.device).total_memory
        peak = profile_peak_memory(loaded, min(self.max_num_batched_tokens, self.max_model_len), self.block_size)
        return int(total * config.gpu_memory_utilization - peak) // per_block

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            model_id=self.loaded.model_id,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            num_kv_blocks=self.kv_cache.num_blocks,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            vocab_size=self.vocab_size,
            eos_token_ids=tuple(sorted(self.eos_token_ids)),
            device=str(self.loaded.device),
            dtype=dtype_name(self.loaded.dtype),
            prefix_caching=self.kv_cache.enable_prefix_caching,
        )

    def validate(self, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """Raise RequestError (INVALID_ARGUMENT) when the request cannot run.
        Reads only settings fixed at start-up, so any thread may call it."""
        problems = []
        if not prompt_token_ids:
            problems.append("prompt_token_ids is empty")
        else:
            bad = next(((i, t) for i, t in enumerate(prompt_token_ids) if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                problems.append(f"prompt token {bad[0]} is id {bad[1]}, outside the vocabulary [0, {self.vocab_size})")
            if len(prompt_token_ids) >= self.max_model_len:
                problems.append(
                    f"the prompt has {len(prompt_token_ids)} tokens; this engine serves at most {self.max_model_len} tokens per sequence "
                    f"(max_model_len), so prompts must be shorter than that"
                )
        problems.extend(sampling.problems())
        if not problems:
            final_len = min(len(prompt_token_ids) + (sampling.max_tokens or self.max_model_len), self.max_model_len)
            # The last token is never fed back, so it needs no KV slot.
            needed = cdiv(final_len - 1, self.block_size)
            if needed > self.kv_cache.num_blocks:
                problems.append(
                    f"the request can grow to {final_len} tokens, needing {needed} KV blocks, but the cache holds only "
                    f"{self.kv_cache.num_blocks} blocks of {self.block_size} tokens: lower max_tokens or the prompt length"
                )
        if problems:
            raise invalid_argument("; ".join(problems))

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, timeout_s: float | None = None) -> None:
        if request_id in self.sequences:
            raise invalid_argument(f"request id {request_id!r} is already live in this engine")
        self.validate(prompt_token_ids, sampling)
        queued = self.scheduler.num_queued()
        if queued >= self.max_queue_len:
            # Refusing at once lets the caller retry elsewhere or later; queueing
            # without bound would only turn overload into timeouts.
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{queued} requests are already queued behind a full batch of {self.scheduler.max_num_seqs} "
                f"(--max-queue-len {self.max_queue_len}); retry later",
            )
        now = time.monotonic()
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            arrival_time=now,
            deadline=None if timeout_s is None else now + timeout_s,
        )
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        log.debug("request added", request_id=request_id, prompt_tokens=len(prompt_token_ids))

    def abort(self, request_id: str) -> None:
        """Stop a request at once and free its blocks; unknown or finished ids are ignored.
        Its CANCELLED output comes with the next step."""
        seq = self.sequences.get(request_id)
        if seq is not None:
            self._finished_outside_step.append(self._finish(seq, FinishReason.CANCELLED))

    def has_unfinished(self) -> bool:
        return bool(self.sequences) or bool(self._finished_outside_step)

    def step(self) -> list[RequestOutput]:
        outputs, self._finished_outside_step = self._finished_outside_step, []
        self._expire_deadlines(outputs)
        scheduled = self.scheduler.schedule()
        if not scheduled.scheduled:
            return outputs
        self.steps_total += 1
        sampled_sequences, sampled = self.runner.execute(scheduled.scheduled)
        self.scheduler.update_computed(scheduled)
        for row, seq in enumerate(sampled_sequences):
            token_id = sampled.token_ids[row]
            logprob = sampled.logprobs[row]
            seq.output_token_ids.append(token_id)
            self.generation_tokens_total += 1
            output = self._new_output(seq, [token_id])
            if logprob is not None:
                output.logprobs.append(logprob)
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                self._release(seq, reason)
                output.finish_reason = reason
                output.matched_stop_token_id = seq.matched_stop_token_id
            outputs.append(output)
        return outputs

    def _stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.sampling
        if (token_id in self.eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
            seq.matched_stop_token_id = token_id
            return FinishReason.STOP
        if params.max_tokens is not None and len(seq.output_token_ids) >= params.max_tokens:
            return FinishReason.LENGTH
        if seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _new_output(self, seq: Sequence, token_ids: list[int]) -> RequestOutput:
        output = RequestOutput(seq.request_id, token_ids)
        if not seq.first_output_sent:
            seq.first_output_sent = True
            output.num_prompt_tokens = seq.num_prompt_tokens
            output.num_cached_tokens = seq.num_cached_tokens
            scheduled_at = seq.first_scheduled_time if seq.first_scheduled_time is not None else time.monotonic()
            output.queue_time_s = scheduled_at - seq.arrival_time
            self.prompt_tokens_total += seq.num_prompt_tokens
        return output

    def _release(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        del self.sequences[seq.request_id]
        self.sampler.forget(seq.request_id)
        self.requests_finished_total += 1
        log.debug("request finished", request_id=seq.request_id, reason=reason.value, output_tokens=len(seq.output_token_ids))

    def _finish(self, seq: Sequence, reason: FinishReason) -> RequestOutput:
        """Finish a request outside the sampling path; returns its final output."""
        self._release(seq, reason)
        output = self._new_output(seq, [])
        output.finish_reason = reason
        return output

    def _expire_deadlines(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        expired = [s for s in self.sequences.values() if s.deadline is not None and s.deadline <= now]
        for seq in expired:
            outputs.append(self._finish(seq, FinishReason.TIME_LIMIT))

    def load(self) -> EngineLoad:
        return EngineLoad(len(self.scheduler.running), len(self.scheduler.waiting), self.kv_cache.usage)

    def stats(self) -> EngineStats:
        pool = self.kv_cache.pool
        return EngineStats(
            load=self.load(),
            num_total_blocks=self.kv_cache.num_blocks,
            num_free_blocks=pool.num_free,
            num_cached_free_blocks=pool.num_cached_free,
            prefix_cache_queried_tokens=self.kv_cache.queried_tokens,
            prefix_cache_hit_tokens=self.kv_cache.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            requests_finished_total=self.requests_finished_total,
            steps_total=self.steps_total,
        )
