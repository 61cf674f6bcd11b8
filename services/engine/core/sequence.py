"""Request state inside the engine core: what was asked, what was produced,
and how much of it sits in the KV cache."""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field

from pagewire.services.common.limit_checks import at_most, logit_bias_problem
from pagewire.services.common.limits import MAX_LOGPROBS, MAX_PENALTY, MAX_STOP_TOKEN_IDS, MAX_TEMPERATURE, MIN_OUTPUT_TOKENS


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"
    TIME_LIMIT = "time_limit"


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """Token-level sampling controls; defaults mean "off" (see common.proto)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    # Whether the engine may propose and verify several tokens per step
    # (when it runs with --speculative-method); the output is the same.
    speculative: bool = True
    # (token id, bias) pairs added to the logits before sampling (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        # Below this a temperature only overflows the scaled logits; it means greedy.
        return self.temperature < 1e-5

    # Both asked of every running request at every step, so computed once.
    @functools.cached_property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @functools.cached_property
    def plain_greedy(self) -> bool:
        """The argmax of the logits as they come is all it takes: greedy, with
        nothing that changes the logits first or asks for more than the token."""
        return self.greedy and self.logprobs is None and not self.has_penalties and not self.logit_bias

    def problems(self) -> list[str]:
        """Human-readable reasons these values are out of range (empty when valid)."""
        found = []
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            found.append(f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            found.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            found.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            found.append(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty < math.inf:  # written so that NaN fails too
            found.append(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}")
        if not -MAX_PENALTY <= self.presence_penalty <= MAX_PENALTY:
            found.append(f"presence_penalty must be in [{-MAX_PENALTY:g}, {MAX_PENALTY:g}], got {self.presence_penalty}")
        if not -MAX_PENALTY <= self.frequency_penalty <= MAX_PENALTY:
            found.append(f"frequency_penalty must be in [{-MAX_PENALTY:g}, {MAX_PENALTY:g}], got {self.frequency_penalty}")
        if self.max_tokens is not None and self.max_tokens < MIN_OUTPUT_TOKENS:
            found.append(f"max_tokens must be >= {MIN_OUTPUT_TOKENS}, got {self.max_tokens}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            found.append(at_most("stop_token_ids", len(self.stop_token_ids), MAX_STOP_TOKEN_IDS))
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            found.append(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.n != 1:
            found.append(f"n must be 1 (one sequence per request; the gateway runs n > 1 as n requests), got {self.n}")
        if (problem := logit_bias_problem(dict(self.logit_bias))) is not None:
            found.append(problem)
        return found


# Plain greedy sampling: the argmax of the logits as they come.
GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class SamplerOutput:
    """One step's new tokens, a list per sequence whose next token was due:
    the proposals it accepted (when the step verified some), then the token
    sampled after them."""

    token_ids: list[list[int]]
    # One per token when the request asked for logprobs; else empty lists.
    logprobs: list[list[TokenLogprob]]


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    deadline: float | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    # Tokens (prompt then output) whose K/V are in the cache; the rest still need a forward pass.
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Bumped whenever blocks leave block_table's tail (trimmed after rejected
    # proposals, freed on preemption): between bumps the table only grows,
    # so a copy of it needs only its new tail. (Blocks that slide out of a
    # window become SLID_OUT in place; attention never reads those entries.)
    block_table_epoch: int = 0
    # Hashes of the full blocks of prompt + output tokens, in order (filled lazily).
    block_hashes: list[bytes] = field(default_factory=list)
    # Leading blocks of block_table already entered in the prefix cache.
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    # Whether the first output (which carries the prompt figures) went out.
    first_output_sent: bool = False
    finish_reason: FinishReason | None = None
    matched_stop_token_id: int | None = None
    # Tokens sampled by launched steps that the host has not read back yet:
    # they count for scheduling, and the next step takes them from the device.
    num_pending_tokens: int = 0
    # Prompt plus at most max_tokens, within max_model_len: no step goes past it.
    max_total_tokens: int | None = None
    # Proposed continuation that the step in flight verifies: fed as inputs
    # after the last known token, and not part of the sequence until accepted.
    spec_token_ids: list[int] = field(default_factory=list)
    # Its output follows a grammar (structured output), whose matcher the
    # executor holds: it needs its tokens on the host before each step and
    # never speculates.
    constrained: bool = False
    # Whether its decode steps propose and verify speculative tokens.
    speculative: bool = False
    # The sampled ids that end it (its stop token ids, and EOS unless ignored).
    stop_ids: frozenset[int] = frozenset()
    # The LoRA adapter it runs with ("": the base model); its K/V is cached under that name.
    lora: str = ""
    # Roots its prefix cache hash chain: the adapter's name and which load of it ("" without one).
    prefix_salt: str = ""

    # Tokens whose ids the host holds: the prompt and the outputs read back.
    # A count kept beside the lists (append_output), since a decode step asks
    # for it several times per sequence and a property call costs 8x an attribute.
    num_known_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_known_tokens = len(self.prompt_token_ids) + len(self.output_token_ids)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.num_known_tokens += 1

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_known_tokens + self.num_pending_tokens

    @property
    def reached_length_limit(self) -> bool:
        """Every token it may have is sampled (some maybe still pending), so no step needs it again."""
        return self.max_total_tokens is not None and self.num_tokens >= self.max_total_tokens

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def token_slice(self, start: int, stop: int) -> list[int]:
        """The known tokens at positions [start, stop) (stop at most num_known_tokens)."""
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:n] + self.output_token_ids[max(start - n, 0) : stop - n]


@dataclass(slots=True)
class RequestOutput:
    """What one request did in one step."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    matched_stop_token_id: int | None = None
    # Set on a request's first output only.
    num_prompt_tokens: int | None = None
    num_cached_tokens: int | None = None
    queue_time_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
