"""The gateway's check of a GenerateRequest before any peer sees it: what the
protos declare invalid is refused with a message naming the field (the REST
shim reports it as `param`, gRPC in a BadRequest detail)."""

from __future__ import annotations

import math

from pagewire.services.common.errors import invalid_argument
from pagewire.v1 import engine_pb2, gateway_pb2

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20


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
        _check_range("temperature", s.temperature, 0, 100)
    if s.HasField("top_p"):
        _check_range("top_p", s.top_p, 0, 1, low_open=True)
    if s.HasField("top_k") and s.top_k < 0:
        raise invalid_argument(f"top_k must be >= 0 (0 = off), got {s.top_k}", field="top_k")
    if s.HasField("min_p"):
        _check_range("min_p", s.min_p, 0, 1)
    if s.HasField("repetition_penalty") and not (math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0):
        raise invalid_argument(f"repetition_penalty must be > 0 (1 = off), got {s.repetition_penalty:g}", field="repetition_penalty")
    if s.HasField("presence_penalty"):
        _check_range("presence_penalty", s.presence_penalty, -2, 2)
    if s.HasField("frequency_penalty"):
        _check_range("frequency_penalty", s.frequency_penalty, -2, 2)
    if s.HasField("max_tokens") and s.max_tokens < 1:
        raise invalid_argument(f"max_tokens must be >= 1, got {s.max_tokens}", field="max_tokens")
    if s.HasField("logprobs") and s.logprobs > MAX_LOGPROBS:
        raise invalid_argument(f"logprobs must be at most {MAX_LOGPROBS}, got {s.logprobs}", field="logprobs")
    if s.HasField("n") and s.n != 1:
        raise invalid_argument(f"n must be 1 (one completion per request), got {s.n}; send several requests instead", field="n")


def _check_stop(request: gateway_pb2.GenerateRequest) -> None:
    if len(request.stop) > MAX_STOP_STRINGS:
        raise invalid_argument(f"at most {MAX_STOP_STRINGS} stop strings are accepted, got {len(request.stop)}", field="stop")
    if any(not stop for stop in request.stop):
        raise invalid_argument("stop strings must not be empty", field="stop")


def _check_timeout(request: gateway_pb2.GenerateRequest) -> None:
    if request.timeout.seconds < 0 or request.timeout.nanos < 0:
        raise invalid_argument("timeout must not be negative", field="timeout")


def validate_request(request: gateway_pb2.GenerateRequest) -> None:
    """Refuse what the protos declare invalid, with a message naming the field."""
    _check_input(request)
    _check_sampling(request)
    _check_stop(request)
    _check_timeout(request)


def check_prompt_length(prompt_len: int, model: engine_pb2.EngineInfo) -> None:
    """Refuse a prompt that leaves the model no room for an output token."""
    if prompt_len >= model.max_model_len:
        raise invalid_argument(
            f"the prompt has {prompt_len} tokens; {model.model_id} accepts at most {model.max_model_len - 1} "
            f"(max_model_len {model.max_model_len} includes at least one output token): shorten the prompt",
            field="prompt",
        )
