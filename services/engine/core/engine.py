"""EngineCore: the engine without transport or device. Requests come in as
token ids, each `step()` schedules one batch, has the executor run it, and
reports what every request did. The executor (executor/model_executor.py)
owns the model, the KV tensors and the device; the core owns the requests,
the scheduler and the block pool."""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass
from typing import Protocol

from pagewire.services.common.errors import Refusal, RequestError, invalid_argument
from pagewire.services.common.limit_checks import timeout_problem
from pagewire.services.common.limits import MIN_OUTPUT_TOKENS
from pagewire.services.common.logging import get_logger
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.kv_cache import KVCacheManager
from pagewire.services.engine.core.proposer import NgramProposer, ProposalRequest, Proposer
from pagewire.services.engine.core.scheduler import ScheduledSequence, Scheduler
from pagewire.services.engine.core.sequence import FinishReason, RequestOutput, SamplerOutput, SamplingParams, Sequence, SequenceStatus

log = get_logger("engine")

# Entries of ended requests the deadline heap may hold beyond twice the live
# requests before it is rebuilt: its memory follows the live requests.
STALE_DEADLINES_KEPT = 64


@dataclass(frozen=True)
class ExecutorSpec:
    """What the executor settled at start-up that the core schedules by."""

    model_id: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    max_num_batched_tokens: int
    num_kv_blocks: int
    device: str
    dtype: str
    # The model's attention window (0: none): blocks that slide out of it are freed.
    sliding_window: int = 0
    # Element type of the KV cache ("fp8" or the compute dtype) and of the projections' weights.
    kv_cache_dtype: str = ""
    quantization: str = "none"
    # Bytes of the weights each tensor-parallel rank holds (one entry on one device).
    weight_bytes_per_rank: tuple[int, ...] = ()
    # LoRA: adapters resident on the device at once (0: no LoRA slots), and those loaded at start.
    max_loras: int = 0
    lora_adapters: tuple[str, ...] = ()


class LaunchedStep(Protocol):
    """A step queued on the device: which sequences sample a token in it, and
    a way to wait for those tokens."""

    sequences: list[Sequence]

    def start_masks(self) -> None:
        """Start filling the grammar masks of its constrained sequences, once
        the step before has been read back."""

    def resolve(self) -> SamplerOutput: ...


class Executor(Protocol):
    """Runs the model over a scheduled batch (executor/model_executor.py)."""

    spec: ExecutorSpec

    def launch(self, scheduled: list[ScheduledSequence]) -> LaunchedStep | None: ...

    def forget(self, request_id: str) -> None: ...

    def constrain(self, request_id: str, compiled_grammar: str, stop_token_ids: tuple[int, ...]) -> None:
        """Give the request a grammar (executor/grammar.py) that masks its
        tokens from now on; RequestError when it does not load."""

    def read_lora(self, name: str, path: str) -> object:
        """Read a LoRA adapter into host memory (any thread); RequestError when it cannot be served."""

    def add_lora(self, adapter: object) -> None:
        """Serve an adapter read_lora returned."""

    def unload_lora(self, name: str) -> None: ...


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
    kv_cache_dtype: str = ""
    quantization: str = "none"
    weight_bytes_per_rank: tuple[int, ...] = ()
    # Names of the LoRA adapters loaded now (requests name one in AddRequest.lora).
    lora_adapters: tuple[str, ...] = ()

    @property
    def tensor_parallel_size(self) -> int:
        return max(1, len(self.weight_bytes_per_rank))


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
    # Speculative decoding: tokens proposed and verified, those accepted, and
    # those accepted at each proposal position (1st, 2nd, ...).
    spec_decode_draft_tokens_total: int = 0
    spec_decode_accepted_tokens_total: int = 0
    spec_decode_accepted_by_position: tuple[int, ...] = ()
    # LoRA adapters of the running and the waiting sequences, and the slots (--max-loras).
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()
    max_loras: int = 0


class EngineCore:
    """Not thread-safe: one thread owns it (the servicer's step loop)."""

    def __init__(self, config: EngineConfig, executor: Executor):
        spec = executor.spec
        self.executor = executor
        self.spec = spec
        self.block_size = config.block_size
        self.vocab_size = spec.vocab_size
        self.eos_token_ids = frozenset(spec.eos_token_ids)
        self.max_model_len = spec.max_model_len
        self.max_num_batched_tokens = spec.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.max_queue_len = config.max_queue_len
        self.async_scheduling = config.async_scheduling
        # The launched step whose tokens the host has not read back yet.
        self._in_flight: LaunchedStep | None = None
        self.kv_cache = KVCacheManager(spec.num_kv_blocks, self.block_size, config.enable_prefix_caching, spec.sliding_window)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, self.max_num_batched_tokens, spec.max_loras)
        # Adapter name -> which load of it this is: a reloaded adapter's K/V is never reused.
        self.lora_adapters = dict.fromkeys(spec.lora_adapters, 0)
        # The names as one tuple, replaced whole, so other threads may read `info` while the step thread loads.
        self.lora_adapter_names = tuple(sorted(self.lora_adapters))
        self._lora_loads = 0
        self.sequences: dict[str, Sequence] = {}
        # (deadline, arrival order, sequence) of each request given a timeout,
        # soonest first. A request that ends before its deadline leaves its
        # entry behind until the deadline passes or the heap is rebuilt.
        self._deadlines: list[tuple[float, int, Sequence]] = []
        self._arrivals = itertools.count()
        self._finished_outside_step: list[RequestOutput] = []
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_finished_total = 0
        self.steps_total = 0
        self.proposer: Proposer | None = {
            "ngram": lambda: NgramProposer(config.num_speculative_tokens, config.ngram_min, config.ngram_max),
            "draft": lambda: executor.draft_proposer,
        }.get(config.speculative_method, lambda: None)()
        self.spec_decode_draft_tokens_total = 0
        self.spec_decode_accepted_by_position = [0] * (config.num_speculative_tokens if self.proposer else 0)
        log.info(
            "engine ready", num_kv_blocks=spec.num_kv_blocks, block_size=self.block_size, max_model_len=self.max_model_len,
            kv_cache_dtype=spec.kv_cache_dtype, quantization=spec.quantization,
        )  # fmt: skip

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            model_id=self.spec.model_id,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            num_kv_blocks=self.kv_cache.num_blocks,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            vocab_size=self.vocab_size,
            eos_token_ids=tuple(sorted(self.eos_token_ids)),
            device=self.spec.device,
            dtype=self.spec.dtype,
            prefix_caching=self.kv_cache.enable_prefix_caching,
            kv_cache_dtype=self.spec.kv_cache_dtype,
            quantization=self.spec.quantization,
            weight_bytes_per_rank=self.spec.weight_bytes_per_rank,
            lora_adapters=self.lora_adapter_names,
        )

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Read and install an adapter at once (the step loop reads it off the step thread instead)."""
        self.install_lora_adapter(name, self.read_lora_adapter(name, path))

    def read_lora_adapter(self, name: str, path: str) -> object:
        """An adapter read from disk, for install_lora_adapter; RequestError when
        it cannot be served. Any thread may call it: it changes nothing."""
        if not name:
            raise invalid_argument("lora_name must be non-empty", "lora_name")
        return self.executor.read_lora(name, path)

    def install_lora_adapter(self, name: str, adapter: object) -> None:
        """Serve a read adapter (or replace one of its name, when none of that
        one's requests is live); requests may name it from now on."""
        self._check_unused(name, "replaced")
        self.executor.add_lora(adapter)
        self._lora_loads += 1
        self.lora_adapters[name] = self._lora_loads
        self.lora_adapter_names = tuple(sorted(self.lora_adapters))

    def unload_lora_adapter(self, name: str) -> None:
        """Forget an adapter. Refused (FAILED_PRECONDITION) while a live request
        uses it, rather than cutting that request short: unload once it ends."""
        if name not in self.lora_adapters:
            raise RequestError(Refusal.NOT_FOUND, f"LoRA adapter {name!r} is not loaded on this engine", "lora_name")
        self._check_unused(name, "unloaded")
        self.executor.unload_lora(name)
        del self.lora_adapters[name]
        self.lora_adapter_names = tuple(sorted(self.lora_adapters))

    def _check_unused(self, name: str, action: str) -> None:
        users = sum(1 for seq in self.sequences.values() if seq.lora == name)
        if users:
            raise RequestError(
                Refusal.FAILED_PRECONDITION, f"LoRA adapter {name!r} is in use by {users} live requests and cannot be {action} now; retry once they end", "lora_name"
            )

    def validate(self, prompt_token_ids: list[int], sampling: SamplingParams, timeout_s: float | None = None) -> None:
        """Raise RequestError (INVALID_ARGUMENT) when the request cannot run.
        Reads only settings fixed at start-up, so any thread may call it."""
        problems = []
        if not prompt_token_ids:
            problems.append("prompt_token_ids is empty")
        else:
            bad = next(((i, t) for i, t in enumerate(prompt_token_ids) if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                problems.append(f"prompt token {bad[0]} is id {bad[1]}, outside the vocabulary [0, {self.vocab_size})")
            if len(prompt_token_ids) > self.max_model_len - MIN_OUTPUT_TOKENS:
                problems.append(
                    f"the prompt has {len(prompt_token_ids)} tokens; this engine serves at most {self.max_model_len} tokens per sequence "
                    f"(max_model_len), output included, so a prompt may have at most {self.max_model_len - MIN_OUTPUT_TOKENS}"
                )
        problems.extend(sampling.problems())
        if (bad_bias := next((t for t, _ in sampling.logit_bias if t >= self.vocab_size), None)) is not None:
            problems.append(f"logit_bias names token id {bad_bias}, outside the vocabulary [0, {self.vocab_size})")
        if timeout_s is not None and (problem := timeout_problem(timeout_s)) is not None:
            problems.append(problem)
        if not problems:
            final_len = min(len(prompt_token_ids) + (sampling.max_tokens or self.max_model_len), self.max_model_len)
            # The last token is never fed back, so it needs no KV slot.
            needed = self.kv_cache.most_blocks_held(final_len - 1, self.max_num_batched_tokens)
            if needed > self.kv_cache.num_blocks:
                problems.append(
                    f"the request can grow to {final_len} tokens, needing {needed} KV blocks, but the cache holds only "
                    f"{self.kv_cache.num_blocks} blocks of {self.block_size} tokens: lower max_tokens or the prompt length"
                )
        if problems:
            raise invalid_argument("; ".join(problems))

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        timeout_s: float | None = None,
        compiled_grammar: str = "",
        lora: str = "",
    ) -> None:
        if request_id in self.sequences:
            raise invalid_argument(f"request id {request_id!r} is already live in this engine")
        if lora and lora not in self.lora_adapters:
            loaded = ", ".join(sorted(self.lora_adapters)) or "none"
            raise RequestError(Refusal.NOT_FOUND, f"LoRA adapter {lora!r} is not loaded on this engine (loaded: {loaded})", "lora")
        self.validate(prompt_token_ids, sampling, timeout_s)
        queued = self.scheduler.num_queued()
        if queued >= self.max_queue_len:
            # Refusing at once lets the caller retry elsewhere or later; queueing
            # without bound would only turn overload into timeouts.
            raise RequestError(
                Refusal.RESOURCE_EXHAUSTED,
                f"{queued} requests are already queued behind a full batch of {self.scheduler.max_num_seqs} "
                f"(--max-queue-len {self.max_queue_len}); retry later",
            )
        now = time.monotonic()
        constrained = bool(compiled_grammar)
        # A grammar allows its stop tokens (EOS among them, ignore_eos or not)
        # only once its output is complete, and ends there.
        ends_on_eos = constrained or not sampling.ignore_eos
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            arrival_time=now,
            deadline=None if timeout_s is None else now + timeout_s,
            max_total_tokens=min(len(prompt_token_ids) + (sampling.max_tokens or self.max_model_len), self.max_model_len),
            constrained=constrained,
            # Penalties would have to count each earlier proposal of the same
            # step as output, so requests with penalties decode one token a
            # step; so do constrained ones, whose grammar would have to mask
            # every proposal's row from the state after the proposals before it.
            speculative=self.proposer is not None and sampling.speculative and not sampling.has_penalties and not constrained,
            stop_ids=(self.eos_token_ids if ends_on_eos else frozenset()) | frozenset(sampling.stop_token_ids),
            lora=lora,
            prefix_salt=f"{lora}\0{self.lora_adapters[lora]}" if lora else "",
        )
        if seq.deadline is not None:
            heapq.heappush(self._deadlines, (seq.deadline, next(self._arrivals), seq))
        if compiled_grammar:
            # A complete output may end with any token that would end it unconstrained.
            self.executor.constrain(request_id, compiled_grammar, tuple(sorted(seq.stop_ids)))
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
        return bool(self.sequences) or bool(self._finished_outside_step) or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then read back the tokens of the step
        before it: with async scheduling the device runs step N while the host
        schedules step N+1, and a request that finished in step N costs one
        more step whose token is dropped. A step with constrained sequences
        has its masks started once the step before is read back, and its
        sampling queued by the next call's launch once that call has
        scheduled and prepared the next step's inputs (or by the read-back),
        so the masks are filled while the host does both."""
        outputs, self._finished_outside_step = self._finished_outside_step, []
        self._expire_deadlines(outputs)
        if self._in_flight is not None and self._needs_history_on_host():
            outputs += self._read_back()
        scheduled = self.scheduler.schedule(self._propose())
        launched = None
        if scheduled.scheduled:
            self.steps_total += 1
            launched = self.executor.launch(scheduled.scheduled)
            self.scheduler.update_computed(scheduled)
        if self._in_flight is not None:
            outputs += self._read_back()
        if launched is not None:
            launched.start_masks()
            for seq in launched.sequences:
                seq.num_pending_tokens += 1
            self._in_flight = launched
            if not self.async_scheduling:
                outputs += self._read_back()
        return outputs

    def _needs_history_on_host(self) -> bool:
        """Penalties are computed from the host's copy of a request's output
        tokens, so a step that applies them waits for the step before; so does
        one that proposes speculative tokens (the lookup needs the newest
        token), and one after a verify step, whose token count only the
        read-back tells. A step that masks by a grammar need not: its forward
        pass is launched first, and its sampling only after the read-back
        has brought the newest tokens to the host."""
        return any(seq.speculative or seq.sampling.has_penalties for seq in self.scheduler.running)

    def _propose(self) -> dict[str, list[int]]:
        """Speculative tokens for the decoding sequences whose tokens the host
        all holds, at most as many as their length limit leaves room for
        after the token the step samples anyway."""
        if self.proposer is None:
            return {}
        requests = [
            ProposalRequest(seq.request_id, seq.prompt_token_ids + seq.output_token_ids, (seq.max_total_tokens or self.max_model_len) - seq.num_tokens - 1)
            for seq in self.scheduler.running
            if seq.speculative and not seq.num_pending_tokens and seq.num_computed_tokens == seq.num_tokens - 1
        ]
        return self.proposer.propose_all(requests) if requests else {}

    def _read_back(self) -> list[RequestOutput]:
        launched, self._in_flight = self._in_flight, None
        assert launched is not None
        sampled = launched.resolve()
        outputs = []
        for seq, token_ids, logprobs in zip(launched.sequences, sampled.token_ids, sampled.logprobs):
            seq.num_pending_tokens -= 1
            drafts = seq.spec_token_ids
            if drafts:
                seq.spec_token_ids = []
                self._count_acceptance(len(drafts), len(token_ids) - 1)
            if seq.status is SequenceStatus.FINISHED:
                continue  # finished or aborted while its step ran: the tokens are dropped
            if len(token_ids) == 1 and not logprobs:  # most steps of most sequences: one token, no logprobs
                output = self._new_output(seq, token_ids)
                seq.append_output(token_ids[0])
                reason = self._stop_reason(seq, token_ids[0])
            else:
                output = self._new_output(seq, [])
                for token_id, logprob in zip(token_ids, logprobs or [None] * len(token_ids)):
                    seq.append_output(token_id)
                    output.new_token_ids.append(token_id)
                    if logprob is not None:
                        output.logprobs.append(logprob)
                    # A stop among accepted proposals ends the output there.
                    reason = self._stop_reason(seq, token_id)
                    if reason is not None:
                        break
            self.generation_tokens_total += len(output.new_token_ids)
            if reason is not None:
                self._release(seq, reason)
                output.finish_reason = reason
                output.matched_stop_token_id = seq.matched_stop_token_id
            else:
                if drafts:
                    self.scheduler.roll_back_rejected(seq)
                self.kv_cache.cache_computed_blocks(seq)
            outputs.append(output)
        return outputs

    def _count_acceptance(self, num_drafts: int, num_accepted: int) -> None:
        self.spec_decode_draft_tokens_total += num_drafts
        for position in range(num_accepted):
            self.spec_decode_accepted_by_position[position] += 1

    @staticmethod
    def _stop_reason(seq: Sequence, token_id: int) -> FinishReason | None:
        if token_id in seq.stop_ids:
            seq.matched_stop_token_id = token_id
            return FinishReason.STOP
        # max_tokens, or max_model_len, reached.
        if seq.num_known_tokens >= seq.max_total_tokens:  # type: ignore[operator]  # set by add_request
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
        self.executor.forget(seq.request_id)
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
        while self._deadlines and self._deadlines[0][0] <= now:
            seq = heapq.heappop(self._deadlines)[2]
            if self.sequences.get(seq.request_id) is seq:  # not ended already (its id may be live again)
                outputs.append(self._finish(seq, FinishReason.TIME_LIMIT))
        if len(self._deadlines) > 2 * len(self.sequences) + STALE_DEADLINES_KEPT:
            # Mostly ended requests, held until their (maybe distant) deadlines: keep the live ones only.
            self._deadlines = [entry for entry in self._deadlines if self.sequences.get(entry[2].request_id) is entry[2]]
            heapq.heapify(self._deadlines)

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
            spec_decode_draft_tokens_total=self.spec_decode_draft_tokens_total,
            spec_decode_accepted_tokens_total=sum(self.spec_decode_accepted_by_position),
            spec_decode_accepted_by_position=tuple(self.spec_decode_accepted_by_position),
            running_lora_adapters=tuple(sorted({seq.lora for seq in self.scheduler.running if seq.lora})),
            waiting_lora_adapters=tuple(sorted({seq.lora for seq in self.scheduler.waiting if seq.lora})),
            max_loras=self.spec.max_loras,
        )
