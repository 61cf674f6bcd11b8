"""The gateway's check of a GenerateRequest before any peer sees it: what the
protos declare invalid is refused with a message naming the field (the REST
shim reports it as `param`, gRPC in a BadRequest detail)."""

from __future__ import annotations

import math

from pagewire.services.common.errors import invalid_argument
from pagewire.services.common.limit_checks import at_most, check_constraint, check_stop_strings, check_tools, logit_bias_problem, timeout_problem
from pagewire.services.common.limits import (
    MAX_LOGPROBS, MAX_N, MAX_PENALTY, MAX_STOP_TOKEN_IDS, MAX_TEMPERATURE, MAX_TOTAL_OUTPUT_TOKENS, MIN_OUTPUT_TOKENS, max_prompt_chars,
)  # fmt: skip
from pagewire.v1 import engine_pb2, gateway_pb2


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid_argument(f"{name} must be in {bracket}{low:g}, {high:g}], got {value:g}", field=name)


def _check_input(request: gateway_pb2.GenerateRequest) -> None:
    kind = request.WhichOneof("input")
    if kind is None:
        raise invalid_argument("the request has no input: set text, token_ids or chat", field="input")
    if kind == "text" and not request.text:
        raise invalid_argument("text is empty", field="text")
    if kind == "token_ids" and not request.token_ids.ids:
        raise invalid_argument("token_ids is empty", field="token_ids")
    if kind == "chat" and not request.chat.messages:
        raise invalid_argument("chat has no messages", field="messages")


def _check_sampling(request: gateway_pb2.GenerateRequest) -> None:
    s = request.sampling
    if s.HasField("temperature"):
        _check_range("temperature", s.temperature, 0, MAX_TEMPERATURE)
    if s.HasField("top_p"):
        _check_range("top_p", s.top_p, 0, 1, low_open=True)
    if s.HasField("top_k") and s.top_k < 0:
        raise invalid_argument(f"top_k must be >= 0 (0 = off), got {s.top_k}", field="top_k")
    if s.HasField("min_p"):
        _check_range("min_p", s.min_p, 0, 1)
    if s.HasField("repetition_penalty") and not (math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0):
        raise invalid_argument(f"repetition_penalty must be > 0 (1 = off), got {s.repetition_penalty:g}", field="repetition_penalty")
    if s.HasField("presence_penalty"):
        _check_range("presence_penalty", s.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
    if s.HasField("frequency_penalty"):
        _check_range("frequency_penalty", s.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
    if s.HasField("max_tokens") and s.max_tokens < MIN_OUTPUT_TOKENS:
        raise invalid_argument(f"max_tokens must be >= {MIN_OUTPUT_TOKENS}, got {s.max_tokens}", field="max_tokens")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise invalid_argument(at_most("stop_token_ids", len(s.stop_token_ids), MAX_STOP_TOKEN_IDS), field="stop_token_ids")
    if s.HasField("logprobs") and s.logprobs > MAX_LOGPROBS:
        raise invalid_argument(f"logprobs must be at most {MAX_LOGPROBS}, got {s.logprobs}", field="logprobs")
    if s.HasField("n") and not 1 <= s.n <= MAX_N:
        raise invalid_argument(f"n must be in [1, {MAX_N}], got {s.n}", field="n")
    if (problem := logit_bias_problem(s.logit_bias)) is not None:
        raise invalid_argument(problem, field="logit_bias")


def _check_timeout(request: gateway_pb2.GenerateRequest) -> None:
    timeout = request.timeout
    if timeout.seconds < 0 or timeout.nanos < 0:
        raise invalid_argument("timeout must not be negative", field="timeout")
    # Not through timedelta, which overflows on a Duration far past the limit.
    if (problem := timeout_problem(timeout.ToNanoseconds() / 1e9)) is not None:
        raise invalid_argument(problem, field="timeout")


def validate_request(request: gateway_pb2.GenerateRequest) -> None:
    """Refuse what the protos declare invalid, with a message naming the field."""
    _check_input(request)
    _check_sampling(request)
    check_stop_strings(request.stop)
    if request.token_ids_only and request.stop:
        raise invalid_argument(
            "stop strings are matched in the output's text, which a token_ids_only request does not have; end it on ids with sampling.stop_token_ids",
            field="stop",
        )
    _check_timeout(request)
    check_constraint(request.constraint)
    check_tools(request.chat.tools)


def check_fits(request: gateway_pb2.GenerateRequest, model: engine_pb2.EngineInfo, prompts: int = 1) -> None:
    """Refuse, before the prompt is tokenized, what cannot fit the model:
    max_tokens past max_model_len, more output over the `prompts` prompts'
    completions than MAX_TOTAL_OUTPUT_TOKENS, a logit_bias id outside the
    vocabulary, a prompt of too many token ids, or one of more characters
    than the longest prompt can have."""
    max_tokens = request.sampling.max_tokens
    if request.sampling.HasField("max_tokens") and max_tokens > model.max_model_len:
        raise invalid_argument(
            f"max_tokens must be at most {model.max_model_len} (max_model_len of {model.model_id}, prompt included), got {max_tokens}", field="max_tokens"
        )
    completions = prompts * (request.sampling.n or 1)
    per_completion = max_tokens if request.sampling.HasField("max_tokens") else model.max_model_len
    if completions > 1 and completions * per_completion > MAX_TOTAL_OUTPUT_TOKENS:
        raise invalid_argument(
            f"{completions} completions of up to {per_completion} tokens each (max_tokens, else max_model_len) exceed the "
            f"{MAX_TOTAL_OUTPUT_TOKENS} output tokens a request may ask for: lower n or max_tokens",
            field="n",
        )
    if (problem := logit_bias_problem(request.sampling.logit_bias, model.vocab_size)) is not None:
        raise invalid_argument(problem, field="logit_bias")
    kind = request.WhichOneof("input")
    if kind == "token_ids":
        check_prompt(list(request.token_ids.ids), model)
        return
    chars = len(request.text) if kind == "text" else sum(len(message.content) for message in request.chat.messages)
    if chars > max_prompt_chars(model.max_model_len):
        raise invalid_argument(
            f"the prompt has {chars} characters, more than {model.max_model_len} tokens of {model.model_id} can hold "
            f"(max_model_len {model.max_model_len}): shorten the prompt",
            field="prompt",
        )


def check_prompt(prompt_ids: list[int], model: engine_pb2.EngineInfo) -> None:
    """Refuse a prompt that leaves the model no room for MIN_OUTPUT_TOKENS or
    holds ids outside its vocabulary."""
    longest, prompt_len = model.max_model_len - MIN_OUTPUT_TOKENS, len(prompt_ids)
    if prompt_len > longest:
        raise invalid_argument(
            f"the prompt has {prompt_len} tokens; {model.model_id} accepts at most {longest} "
            f"(max_model_len {model.max_model_len} includes at least {MIN_OUTPUT_TOKENS} output token): shorten the prompt",
            field="prompt",
        )
    # Checked here, before the ids reach the tokenizer (the prompt's tail
    # opens the detokenizer) and the engine, so the refusal names the field
    # the caller sent.
    if prompt_ids and (largest := max(prompt_ids)) >= model.vocab_size:
        raise invalid_argument(
            f"the prompt holds token id {largest}; {model.model_id} has a vocabulary of {model.vocab_size} (ids 0 to {model.vocab_size - 1})",
            field="prompt",
        )
