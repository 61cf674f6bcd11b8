"""Every public limit (services/common/limits.py) at its value and one past it,
through the real validation paths: the REST shim and the gateway's request
path (with peers that are down, so that an accepted request fails UNAVAILABLE
at its first step), the tokenizer's detokenizer start, and the engine core.
Each refusal names the field."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google.protobuf.duration_pb2 import Duration

from pagewire.services.common.errors import Refusal, RequestError
from pagewire.services.common.grpc_utils import violated_field
from pagewire.services.common.limits import (
    MAX_CHOICES,
    MAX_CONSTRAINT_BYTES,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_PENALTY,
    MAX_PROMPTS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    MAX_TIMEOUT_S,
    MAX_TOOLS,
    MAX_TOTAL_OUTPUT_TOKENS,
    MIN_OUTPUT_TOKENS,
)
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineCore, ExecutorSpec
from pagewire.services.engine.core.sequence import SamplingParams
from pagewire.services.gateway.choices import ChoiceGroup, new_request
from pagewire.services.gateway.clients import EngineReplica
from pagewire.services.gateway.connection import Backoff
from pagewire.services.gateway.hub import Gateway, GatewaySettings
from pagewire.services.gateway.metrics import GatewayMetrics
from pagewire.services.gateway.request import GatewayRequest
from pagewire.services.gateway.rest_api import create_app
from pagewire.services.gateway.router import RoutingPolicy, Target
from pagewire.services.gateway.validation import check_fits, validate_request
from pagewire.services.tokenizer.servicer import TokenizerServicer
from pagewire.v1 import common_pb2, engine_pb2, gateway_pb2, tokenizer_pb2

ROOT = Path(__file__).resolve().parent.parent
MODEL = "limits-test"
MAX_MODEL_LEN = 64
MAX_BODY_BYTES = 4096
VOCAB_SIZE = 1000


class PeersDownHub:
    """A gateway serving MODEL whose tokenizer and replicas are all down: a
    request that passes validation fails UNAVAILABLE at its first step."""

    def __init__(self) -> None:
        self.metrics = GatewayMetrics()

    def request(self, request: gateway_pb2.GenerateRequest, *more_prompts: gateway_pb2.GenerateRequest) -> GatewayRequest | ChoiceGroup:
        return new_request(self, self.metrics, [request, *more_prompts])

    def resolve_model(self, name: str) -> engine_pb2.EngineInfo:
        return engine_pb2.EngineInfo(model_id=MODEL, max_model_len=MAX_MODEL_LEN, vocab_size=VOCAB_SIZE)

    async def resolve(self, model: str, lora: str = "") -> Target:
        return Target(self.resolve_model(model), lora)

    def models(self) -> list[gateway_pb2.ModelCard]:
        return [gateway_pb2.ModelCard(id=MODEL, max_model_len=MAX_MODEL_LEN)]

    def admit(self, request: GatewayRequest) -> None:
        pass

    async def tokenize(self, request: tokenizer_pb2.TokenizeRequest) -> tokenizer_pb2.TokenizeResult:
        raise RequestError(Refusal.UNAVAILABLE, "the tokenizer is down")

    def pick_replica(self, model_id: str, prompt: list[int], lora: str) -> EngineReplica:
        raise RequestError(Refusal.UNAVAILABLE, "no engine replica is up")

    def register(self, request: GatewayRequest) -> None:
        raise AssertionError("no request gets past pick_replica")

    def detokenize(self, items: Iterable[tokenizer_pb2.DetokenizeItem]) -> None:
        raise AssertionError("no request gets past pick_replica")

    async def token_texts(self, token_ids: Iterable[int]) -> dict[int, str]:
        raise AssertionError("no request gets past pick_replica")

    def leave(self, request: GatewayRequest) -> None:
        pass


@pytest.fixture(scope="module")
def rest() -> Iterator[TestClient]:
    with TestClient(create_app(PeersDownHub(), MAX_BODY_BYTES)) as client:  # type: ignore[arg-type]
        yield client


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hi"} | fields


# (field, body at the limit, body one past it); the REST field is the proto field.
REST_LIMITS = {
    "stop-count": ("stop", _completion(stop=["x"] * MAX_STOP_STRINGS), _completion(stop=["x"] * (MAX_STOP_STRINGS + 1))),
    "stop-length": ("stop", _completion(stop=["x" * MAX_STOP_STRING_CHARS]), _completion(stop=["x" * (MAX_STOP_STRING_CHARS + 1)])),
    "stop-token-ids": (
        "stop_token_ids",
        _completion(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS))),
        _completion(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1))),
    ),
    "logprobs": ("logprobs", _completion(logprobs=MAX_LOGPROBS), _completion(logprobs=MAX_LOGPROBS + 1)),
    "max-tokens": ("max_tokens", _completion(max_tokens=MIN_OUTPUT_TOKENS), _completion(max_tokens=MIN_OUTPUT_TOKENS - 1)),
    "temperature": ("temperature", _completion(temperature=MAX_TEMPERATURE), _completion(temperature=MAX_TEMPERATURE + 1)),
    "presence-penalty": ("presence_penalty", _completion(presence_penalty=-MAX_PENALTY), _completion(presence_penalty=-MAX_PENALTY - 1)),
    "frequency-penalty": ("frequency_penalty", _completion(frequency_penalty=MAX_PENALTY), _completion(frequency_penalty=MAX_PENALTY + 1)),
    "prompt-length": (
        "prompt",
        _completion(prompt=[1] * (MAX_MODEL_LEN - MIN_OUTPUT_TOKENS)),
        _completion(prompt=[1] * (MAX_MODEL_LEN - MIN_OUTPUT_TOKENS + 1)),
    ),
    "n": ("n", _completion(n=MAX_N), _completion(n=MAX_N + 1)),
    "prompts": ("prompt", _completion(prompt=["Hi"] * MAX_PROMPTS), _completion(prompt=["Hi"] * (MAX_PROMPTS + 1))),
    "logit-bias-value": ("logit_bias", _completion(logit_bias={"1": -MAX_LOGIT_BIAS}), _completion(logit_bias={"1": -MAX_LOGIT_BIAS - 0.5})),
    "logit-bias-id": ("logit_bias", _completion(logit_bias={str(VOCAB_SIZE - 1): 1}), _completion(logit_bias={str(VOCAB_SIZE): 1})),
}


@pytest.mark.parametrize(("field", "at_limit", "past_limit"), REST_LIMITS.values(), ids=REST_LIMITS.keys())
def test_rest_accepts_each_limit_and_refuses_one_past_it_naming_the_field(
    rest: TestClient, field: str, at_limit: dict[str, Any], past_limit: dict[str, Any]
) -> None:
    accepted = rest.post("/v1/completions", json=at_limit)
    assert accepted.status_code == 503, accepted.text  # past validation, to the peers that are down
    refused = rest.post("/v1/completions", json=past_limit)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == field


LONG_LISTS = {
    "nested-prompt-ids": ("/v1/completions", _completion(prompt=[[1, 2], [1] * (MAX_MODEL_LEN + 1)]), "prompt", "prompt.1 has"),
    "stop": ("/v1/completions", _completion(stop=["x"] * (MAX_MODEL_LEN + 1)), "stop", "stop has"),
    "content-parts": (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * (MAX_MODEL_LEN + 1)}]},
        "messages",
        "messages.0.content has",
    ),
}


@pytest.mark.parametrize(("path", "body", "field", "wording"), LONG_LISTS.values(), ids=LONG_LISTS.keys())
def test_rest_refuses_a_list_longer_than_max_model_len_at_any_depth_naming_it(rest: TestClient, path: str, body: dict[str, Any], field: str, wording: str) -> None:
    error = rest.post(path, json=body).json()["error"]
    assert error["param"] == field and wording in error["message"] and f"max_model_len {MAX_MODEL_LEN}" in error["message"], error


def test_rest_stream_refused_before_any_output_gets_the_plain_error_response(rest: TestClient) -> None:
    refused = rest.post("/v1/completions", json=_completion(stream=True))
    assert refused.status_code == 503 and refused.headers["content-type"] == "application/json"
    assert refused.json()["error"]["code"] == "UNAVAILABLE"


def test_rest_body_of_max_bytes_is_read_and_one_byte_more_is_refused(rest: TestClient) -> None:
    body = json.dumps(_completion()).encode()

    def padded(size: int) -> bytes:
        return body + b" " * (size - len(body))

    json_type = {"content-type": "application/json"}
    assert rest.post("/v1/completions", content=padded(MAX_BODY_BYTES), headers=json_type).status_code == 503
    refused = rest.post("/v1/completions", content=padded(MAX_BODY_BYTES + 1), headers=json_type)
    assert refused.status_code == 413
    assert f"at most {MAX_BODY_BYTES}" in refused.json()["error"]["message"]


def test_gateway_admits_max_concurrent_requests_and_refuses_one_more() -> None:
    limit = 2
    settings = GatewaySettings(
        tokenizers=["127.0.0.1:1"],
        engines=["127.0.0.1:2"],
        routing=RoutingPolicy.LEAST_LOADED,
        affinity_blocks=1,
        max_concurrent_requests=limit,
        channel_options=[],
        backoff=Backoff(0.1, 0.1),
        connect_timeout_s=0.1,
        discovery_interval_s=1.0,
    )

    async def admit_all() -> None:
        gateway = Gateway(settings, GatewayMetrics())
        requests = [gateway.request(gateway_pb2.GenerateRequest(text="Hi")) for _ in range(limit + 1)]
        for request in requests[:limit]:
            gateway.admit(request)
        with pytest.raises(RequestError) as refused:
            gateway.admit(requests[limit])
        assert refused.value.kind is Refusal.RESOURCE_EXHAUSTED and "--max-concurrent-requests" in refused.value.message
        gateway.leave(requests[0])
        gateway.admit(requests[limit])

    asyncio.run(admit_all())


def test_gateway_bounds_the_output_of_all_completions() -> None:
    model = engine_pb2.EngineInfo(model_id=MODEL, max_model_len=MAX_TOTAL_OUTPUT_TOKENS // MAX_N, vocab_size=VOCAB_SIZE)
    check_fits(gateway_pb2.GenerateRequest(text="Hi", sampling=common_pb2.SamplingParams(n=MAX_N)), model)
    longer = engine_pb2.EngineInfo(model_id=MODEL, max_model_len=MAX_TOTAL_OUTPUT_TOKENS // MAX_N + 1, vocab_size=VOCAB_SIZE)
    with pytest.raises(RequestError) as refused:
        check_fits(gateway_pb2.GenerateRequest(text="Hi", sampling=common_pb2.SamplingParams(n=MAX_N)), longer)
    assert refused.value.field == "n" and "max_tokens" in refused.value.message
    # max_tokens set: it bounds each completion instead; prompts count like n.
    check_fits(gateway_pb2.GenerateRequest(text="Hi", sampling=common_pb2.SamplingParams(n=MAX_N, max_tokens=16)), longer, prompts=MAX_PROMPTS)


def test_gateway_logit_bias_count_limit() -> None:
    # Over REST a body's objects are bounded by max_model_len too, 64 here.
    def biased(count: int) -> gateway_pb2.GenerateRequest:
        return gateway_pb2.GenerateRequest(text="Hi", sampling=common_pb2.SamplingParams(logit_bias={i: 1.0 for i in range(count)}))

    assert _refusal(biased(MAX_LOGIT_BIAS_TOKENS)) is None
    refused = _refusal(biased(MAX_LOGIT_BIAS_TOKENS + 1))
    assert refused is not None and refused.field == "logit_bias" and str(MAX_LOGIT_BIAS_TOKENS) in refused.message


def _refusal(request: gateway_pb2.GenerateRequest) -> RequestError | None:
    try:
        validate_request(request)
    except RequestError as exc:
        return exc
    return None


@pytest.mark.parametrize(
    ("timeout", "accepted"),
    [
        (Duration(seconds=MAX_TIMEOUT_S), True),
        (Duration(seconds=MAX_TIMEOUT_S + 1), False),
        (Duration(seconds=MAX_TIMEOUT_S, nanos=1), False),
        # Far past the range of a timedelta: refused, not an overflow.
        (Duration(seconds=10**15), False),
        (Duration(seconds=-1), False),
    ],
    ids=["max", "max+1s", "max+1ns", "overflowing", "negative"],
)
def test_gateway_timeout_limit(timeout: Duration, accepted: bool) -> None:
    refusal = _refusal(gateway_pb2.GenerateRequest(text="Hi", timeout=timeout))
    if accepted:
        assert refusal is None
    else:
        assert refusal is not None and refusal.field == "timeout", refusal


@pytest.mark.parametrize(
    ("field", "at_limit", "past_limit"),
    [
        ("json_schema", common_pb2.Constraint(json_schema="x" * MAX_CONSTRAINT_BYTES), common_pb2.Constraint(json_schema="x" * (MAX_CONSTRAINT_BYTES + 1))),
        ("regex", common_pb2.Constraint(regex="x" * MAX_CONSTRAINT_BYTES), common_pb2.Constraint(regex="x" * (MAX_CONSTRAINT_BYTES + 1))),
        ("ebnf", common_pb2.Constraint(ebnf="x" * MAX_CONSTRAINT_BYTES), common_pb2.Constraint(ebnf="x" * (MAX_CONSTRAINT_BYTES + 1))),
        ("choice", common_pb2.Constraint(choice=common_pb2.Choice(choices=["x"] * MAX_CHOICES)), common_pb2.Constraint(choice=common_pb2.Choice(choices=["x"] * (MAX_CHOICES + 1)))),
        (
            "choice",
            common_pb2.Constraint(choice=common_pb2.Choice(choices=["x" * (MAX_CONSTRAINT_BYTES // 2)] * 2)),
            common_pb2.Constraint(choice=common_pb2.Choice(choices=["x" * (MAX_CONSTRAINT_BYTES // 2)] * 2 + ["x"])),
        ),
    ],
)
def test_gateway_constraint_limits_name_the_field(field: str, at_limit: common_pb2.Constraint, past_limit: common_pb2.Constraint) -> None:
    assert _refusal(gateway_pb2.GenerateRequest(text="Hi", constraint=at_limit)) is None
    refusal = _refusal(gateway_pb2.GenerateRequest(text="Hi", constraint=past_limit))
    assert refusal is not None and refusal.field == f"constraint.{field}", refusal


def test_gateway_tool_limits_name_the_field() -> None:
    def chat(tools: list[common_pb2.Tool]) -> gateway_pb2.GenerateRequest:
        return gateway_pb2.GenerateRequest(chat=gateway_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content="Hi")], tools=tools))

    assert _refusal(chat([common_pb2.Tool(name="f")] * MAX_TOOLS)) is None
    assert _refusal(chat([common_pb2.Tool(name="f", parameters="x" * (MAX_CONSTRAINT_BYTES - 1))])) is None
    for past in ([common_pb2.Tool(name="f")] * (MAX_TOOLS + 1), [common_pb2.Tool(name="f", parameters="x" * MAX_CONSTRAINT_BYTES)], [common_pb2.Tool()]):
        refusal = _refusal(chat(past))
        assert refusal is not None and refusal.field == "tools", refusal


def test_gateway_stop_refusals_say_the_limit_and_what_was_sent() -> None:
    refusal = _refusal(gateway_pb2.GenerateRequest(text="Hi", stop=["x"] * 40))
    assert refusal is not None and refusal.message == f"at most {MAX_STOP_STRINGS} stop strings are accepted, got 40"


@pytest.fixture(scope="module")
def tokenizer(hf_tokenizer: Any) -> TokenizerServicer:
    return TokenizerServicer(hf_tokenizer, MODEL)


@pytest.mark.parametrize(
    ("at_limit", "past_limit"),
    [(["x"] * MAX_STOP_STRINGS, ["x"] * (MAX_STOP_STRINGS + 1)), (["x" * MAX_STOP_STRING_CHARS], ["x" * (MAX_STOP_STRING_CHARS + 1)])],
    ids=["count", "length"],
)
def test_tokenizer_stop_limits(tokenizer: TokenizerServicer, at_limit: list[str], past_limit: list[str]) -> None:
    def start(stop: list[str]) -> tokenizer_pb2.TextDelta | None:
        item = tokenizer_pb2.DetokenizeItem(request_id="r", start=tokenizer_pb2.DetokenizeStart(stop=stop))
        return tokenizer.detokenize_item(item, {})

    assert start(at_limit) is None
    refused = start(past_limit)
    assert refused is not None and violated_field(refused.error) == "stop"


class IdleExecutor:
    """Only the start-up figures the core validates requests by."""

    spec = ExecutorSpec(
        model_id=MODEL,
        vocab_size=VOCAB_SIZE,
        eos_token_ids=(0,),
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=MAX_MODEL_LEN,
        num_kv_blocks=64,
        device="cpu",
        dtype="float32",
    )


ENGINE_LIMITS = {
    "stop-token-ids": (
        "stop_token_ids",
        {"sampling": SamplingParams(stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS)))},
        {"sampling": SamplingParams(stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS + 1)))},
    ),
    "logprobs": ("logprobs", {"sampling": SamplingParams(logprobs=MAX_LOGPROBS)}, {"sampling": SamplingParams(logprobs=MAX_LOGPROBS + 1)}),
    "max-tokens": (
        "max_tokens",
        {"sampling": SamplingParams(max_tokens=MIN_OUTPUT_TOKENS)},
        {"sampling": SamplingParams(max_tokens=MIN_OUTPUT_TOKENS - 1)},
    ),
    "temperature": (
        "temperature",
        {"sampling": SamplingParams(temperature=MAX_TEMPERATURE)},
        {"sampling": SamplingParams(temperature=MAX_TEMPERATURE + 1)},
    ),
    "presence-penalty": (
        "presence_penalty",
        {"sampling": SamplingParams(presence_penalty=MAX_PENALTY)},
        {"sampling": SamplingParams(presence_penalty=MAX_PENALTY + 1)},
    ),
    "frequency-penalty": (
        "frequency_penalty",
        {"sampling": SamplingParams(frequency_penalty=-MAX_PENALTY)},
        {"sampling": SamplingParams(frequency_penalty=-MAX_PENALTY - 1)},
    ),
    "prompt-length": (
        "prompt",
        {"prompt_token_ids": [1] * (MAX_MODEL_LEN - MIN_OUTPUT_TOKENS)},
        {"prompt_token_ids": [1] * (MAX_MODEL_LEN - MIN_OUTPUT_TOKENS + 1)},
    ),
    "timeout": ("timeout", {"timeout_s": float(MAX_TIMEOUT_S)}, {"timeout_s": MAX_TIMEOUT_S + 1.0}),
    "logit-bias-value": (
        "logit_bias",
        {"sampling": SamplingParams(logit_bias=((1, MAX_LOGIT_BIAS),))},
        {"sampling": SamplingParams(logit_bias=((1, MAX_LOGIT_BIAS + 0.5),))},
    ),
    "logit-bias-id": (
        "logit_bias",
        {"sampling": SamplingParams(logit_bias=((VOCAB_SIZE - 1, 1.0),))},
        {"sampling": SamplingParams(logit_bias=((VOCAB_SIZE, 1.0),))},
    ),
    # A negative timeout is refused, not taken as one that has already passed.
    "negative-timeout": ("timeout", {"timeout_s": 0.0}, {"timeout_s": -1e-9}),
}


@pytest.mark.parametrize(("field", "at_limit", "past_limit"), ENGINE_LIMITS.values(), ids=ENGINE_LIMITS.keys())
def test_engine_accepts_each_limit_and_refuses_one_past_it_naming_the_field(field: str, at_limit: dict[str, Any], past_limit: dict[str, Any]) -> None:
    core = EngineCore(EngineConfig(), IdleExecutor())
    request: dict[str, Any] = {"prompt_token_ids": [1, 2, 3], "sampling": SamplingParams()}
    core.validate(**request | at_limit)
    with pytest.raises(RequestError) as refused:
        core.validate(**request | past_limit)
    assert field in refused.value.message


@pytest.mark.parametrize(
    ("proto", "wording"),
    [
        ("gateway.proto", f"at most {MAX_STOP_STRINGS}, none empty, each at most {MAX_STOP_STRING_CHARS} characters"),
        ("tokenizer.proto", f"at most {MAX_STOP_STRINGS}, none empty, each at most {MAX_STOP_STRING_CHARS} characters"),
        ("common.proto", f"At most {MAX_STOP_TOKEN_IDS}."),
        ("common.proto", f"At most {MAX_LOGPROBS}."),
        ("common.proto", f"Must be in [0, {MAX_TEMPERATURE:g}]."),
        ("common.proto", f"Must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]."),
        ("common.proto", f"Must be >= {MIN_OUTPUT_TOKENS}."),
        ("gateway.proto", f"nor over a day ({MAX_TIMEOUT_S} s)"),
        ("engine.proto", f"Must not be negative nor over a day ({MAX_TIMEOUT_S} s)"),
        ("common.proto", f"most {MAX_CONSTRAINT_BYTES} bytes, and there are at most {MAX_CHOICES} choices"),
        ("common.proto", f"none empty, at most {MAX_CHOICES}."),
        ("common.proto", f"At most {MAX_TOOLS} tools, whose descriptions and parameters together have at most {MAX_CONSTRAINT_BYTES} bytes"),
        ("common.proto", f"Must be in [1, {MAX_N}], and n times max_tokens (max_model_len when max_tokens is unset) at most {MAX_TOTAL_OUTPUT_TOKENS}."),
        ("common.proto", f"Each bias must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], each id below the model's vocabulary size; at most {MAX_LOGIT_BIAS_TOKENS} entries."),
    ],
)
def test_the_protos_document_the_limits(proto: str, wording: str) -> None:
    # Comments as running text, whatever their line breaks.
    text = re.sub(r"\s*\n\s*//\s*", " ", (ROOT / "protos" / "pagewire" / "v1" / proto).read_text())
    assert wording in text
