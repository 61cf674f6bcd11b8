"""Fuzz: hypothesis-generated REST bodies and gRPC messages (wrong types,
huge values, unicode, empty, undecodable bytes) against the running gateway.
Each answer is a success or a 4xx / INVALID_ARGUMENT-class status, never a 5xx
or an INTERNAL/UNKNOWN one, and the services stay up. The `model` field only
names served model ids: paths, URLs and the model file's own path are refused
and never read."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagewire.services.common.model import resolve_model
from pagewire.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.reliability.fuzz_inputs import FLOATS, chat_turns, texts, timeouts
from tests.reliability.fuzz_inputs import sampling_params as fuzz_sampling_params
from tests.support.harness import Cluster

SHORT_EXAMPLES = 60
LONG_EXAMPLES = 600
# A valid body may generate: never more than this many tokens.
MAX_TOKENS = st.integers(min_value=1, max_value=2)
# Statuses a client can cause; 5xx (and 503 with every peer up) are server faults.
ACCEPTABLE_HTTP = {200, 400, 404, 413, 422, 429}
ACCEPTABLE_GRPC = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
FUZZ_SETTINGS = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}

# Any JSON value, odd ones favoured: huge and negative numbers, unicode, empties.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(FLOATS)
    | st.text(max_size=40)
    | st.sampled_from(["", "\u0000", "\ud7ff\ue000", "🦀" * 50, "\u202e", "null", "NaN"])
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
messages = st.lists(
    st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "tool", "robot", ""]) | json_values, "content": json_values}),
    max_size=3,
)
common_fields = {
    "model": st.sampled_from(["", "SmolLM2-135M-Instruct", "gpt-4", "/etc/passwd", "../../x.gguf"]) | json_values,
    "temperature": st.floats(allow_nan=False) | json_values,
    "top_p": json_values,
    "top_k": json_values,
    "min_p": json_values,
    "seed": st.integers(min_value=-(2**65), max_value=2**65) | json_values,
    "presence_penalty": json_values,
    "frequency_penalty": json_values,
    "repetition_penalty": json_values,
    "n": json_values,
    "stop": json_values | st.lists(st.text(max_size=5), max_size=20),
    "stop_token_ids": json_values | st.lists(st.integers(min_value=-5, max_value=2**40), max_size=4),
    "ignore_eos": json_values,
    "stream": st.booleans() | json_values,
    "stream_options": json_values,
    "logprobs": json_values,
    "max_tokens": MAX_TOKENS | json_values.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool) and v > 2)),
}
completion_bodies = st.fixed_dictionaries(
    {},
    optional={
        **common_fields,
        "prompt": json_values | st.lists(st.integers(min_value=-3, max_value=2**33), max_size=5) | st.text(max_size=200),
        "echo": json_values,
    },
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        **common_fields,
        "messages": messages | json_values,
        "max_completion_tokens": MAX_TOKENS | st.sampled_from([0, -1, "3", None, 1.5]),
        "top_logprobs": json_values,
    },
)


# A valid body with one field replaced by a fuzzed value: reaches past parsing
# into validation, tokenization and the engine.
near_valid_completions = st.tuples(st.sampled_from(sorted(common_fields) + ["prompt"]), json_values).map(
    lambda field: {"prompt": "Hello", "max_tokens": 1, **({field[0]: field[1]} if field[0] != "max_tokens" else {})}
)


# A valid body that sets no length runs to --max-model-len (2048 tokens, most
# of a minute at batch 1 on a 2-core CPU) where the model does not end it:
# such a body gets this bound, since what this fuzz checks is the status.
UNBOUNDED_LENGTH_CAP = {"max_tokens": 8}


def _post(client: httpx.Client, path: str, body: Any, seen: Counter[int]) -> None:
    if isinstance(body, dict) and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body = {**body, **UNBOUNDED_LENGTH_CAP}
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    seen[response.status_code] += 1
    assert response.status_code in ACCEPTABLE_HTTP, (path, body, response.status_code, response.text[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert {"message", "type", "code"} <= set(error), response.text


def _rest_fuzz(cluster: Cluster, examples: int) -> dict[str, Any]:
    seen: Counter[int] = Counter()
    with httpx.Client(base_url=cluster.rest_url, timeout=60.0) as client:

        @settings(max_examples=examples, **FUZZ_SETTINGS)
        @given(body=completion_bodies | near_valid_completions | json_values)
        def completions(body: Any) -> None:
            _post(client, "/v1/completions", body, seen)

        @settings(max_examples=examples, **FUZZ_SETTINGS)
        @given(body=chat_bodies | json_values)
        def chat(body: Any) -> None:
            _post(client, "/v1/chat/completions", body, seen)

        @settings(max_examples=max(10, examples // 4), **FUZZ_SETTINGS)
        @given(raw=st.binary(max_size=300))
        def raw_bytes(raw: bytes) -> None:
            _post(client, "/v1/completions", raw, seen)

        completions()
        chat()
        raw_bytes()
        # Over the gateway's --max-message-bytes.
        _post(client, "/v1/completions", {"prompt": "x" * (2 << 20), "max_tokens": 1}, seen)
        assert client.get("/health").status_code == 200
    assert seen[413] == 1
    return {"requests": sum(seen.values()), "by_status": {str(code): count for code, count in sorted(seen.items())}, "server_errors": 0}


# Every field unset, at an extreme of its type (subnormals, NaN, the largest
# integers, 65 stop ids...) or arbitrary; at most 2 tokens.
sampling_params = fuzz_sampling_params(st.integers(min_value=0, max_value=2))


@st.composite
def near_valid_requests(draw: st.DrawFn) -> gateway_pb2.GenerateRequest:
    """A valid request with one sampling field fuzzed."""
    fuzzed = draw(sampling_params)
    sampling = common_pb2.SamplingParams(max_tokens=1)
    field = draw(st.sampled_from([f for f in common_pb2.SamplingParams.DESCRIPTOR.fields if f.name != "max_tokens"]))
    if field.is_repeated:
        getattr(sampling, field.name).MergeFrom(getattr(fuzzed, field.name))  # a list, or logit_bias's map
    elif not field.has_presence or fuzzed.HasField(field.name):
        setattr(sampling, field.name, getattr(fuzzed, field.name))
    return gateway_pb2.GenerateRequest(request_id=draw(st.text(max_size=20)), text=draw(st.text(min_size=1, max_size=40)), sampling=sampling)


@st.composite
def generate_requests(draw: st.DrawFn) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(
        request_id=draw(st.text(max_size=20)),
        model=draw(st.sampled_from(["", "SmolLM2-135M-Instruct", "/etc/passwd", "llama"]) | st.text(max_size=20)),
        sampling=draw(sampling_params),
        stop=draw(st.lists(st.text(max_size=6), max_size=20)),
        include_stop_str_in_output=draw(st.booleans()),
    )
    kind = draw(st.sampled_from(["none", "text", "token_ids", "chat"]))
    if kind == "text":
        request.text = draw(st.sampled_from(texts()) | st.text(max_size=200))
    elif kind == "token_ids":
        request.token_ids.ids.extend(draw(st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=8)))
        request.token_ids.SetInParent()
    elif kind == "chat":
        request.chat.messages.extend(common_pb2.ChatMessage(role=role, content=content) for role, content in draw(chat_turns()))
        request.chat.SetInParent()
    if draw(st.booleans()):
        request.timeout.CopyFrom(draw(timeouts()))
    return request


def _grpc_fuzz(cluster: Cluster, examples: int) -> dict[str, Any]:
    seen: Counter[str] = Counter()

    async def complete(channel: grpc.aio.Channel, request: gateway_pb2.GenerateRequest | bytes) -> grpc.StatusCode:
        method = channel.unary_stream("/pagewire.v1.Generation/Complete", request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString())
        try:
            async for _ in method(request, timeout=60):
                pass
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in ACCEPTABLE_GRPC, (request, exc.code(), exc.details())
            return exc.code()

    async def multiplexed(channel: grpc.aio.Channel, requests: list[gateway_pb2.GenerateRequest]) -> grpc.StatusCode:
        """Many requests, bad ones among them, on one Generate stream: each fails alone."""
        stub = gateway_pb2_grpc.GenerationStub(channel)
        call = stub.Generate(timeout=60)
        for request in requests:
            await call.write(gateway_pb2.ClientMessage(start=request))
        await call.done_writing()
        async for message in call:
            for chunk in message.chunks:
                if chunk.error.code:
                    code = next(c for c in grpc.StatusCode if c.value[0] == chunk.error.code)
                    assert code in ACCEPTABLE_GRPC, (chunk, requests)
        return await call.code()

    async def run() -> None:
        async with grpc.aio.insecure_channel(cluster.gateway.address) as channel:

            @settings(max_examples=examples, **FUZZ_SETTINGS)
            @given(request=generate_requests() | near_valid_requests())
            def single(request: gateway_pb2.GenerateRequest) -> None:
                seen[asyncio.run_coroutine_threadsafe(complete(channel, request), loop).result().name] += 1

            @settings(max_examples=max(5, examples // 6), **FUZZ_SETTINGS)
            @given(requests=st.lists(generate_requests(), min_size=1, max_size=6, unique_by=lambda r: r.request_id))
            def stream(requests: list[gateway_pb2.GenerateRequest]) -> None:
                code = asyncio.run_coroutine_threadsafe(multiplexed(channel, requests), loop).result()
                assert code is grpc.StatusCode.OK
                seen["stream_ok"] += 1

            @settings(max_examples=max(10, examples // 4), **FUZZ_SETTINGS)
            @given(raw=st.binary(max_size=200))
            def raw_bytes(raw: bytes) -> None:
                seen[asyncio.run_coroutine_threadsafe(complete(channel, raw), loop).result().name] += 1

            loop = asyncio.get_running_loop()
            # hypothesis drives synchronous tests: run them off the loop the channel lives on.
            await asyncio.to_thread(single)
            await asyncio.to_thread(stream)
            await asyncio.to_thread(raw_bytes)

    asyncio.run(run())
    return {"calls": sum(seen.values()), "by_status": dict(sorted(seen.items())), "server_errors": 0}


def _model_paths(cluster: Cluster) -> dict[str, Any]:
    """Only the served model id selects a model; anything path-like is NOT_FOUND."""
    model_file = resolve_model(None)
    attempts = [
        "/etc/passwd",
        "../../../../etc/passwd",
        "file:///etc/passwd",
        str(model_file.directory),
        *(str(path) for path in model_file.directory.iterdir() if path.is_file()),
        "~/.ssh/id_rsa",
        "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    ]
    refused = 0
    with httpx.Client(base_url=cluster.rest_url, timeout=30.0) as client:
        served = [card["id"] for card in client.get("/v1/models").json()["data"]]
        for model in attempts:
            response = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})
            assert response.status_code == 404, (model, response.status_code, response.text)
            assert response.json()["error"]["code"] == "NOT_FOUND"
            assert "root:" not in response.text
            refused += 1
        ok = client.post("/v1/completions", json={"model": served[0], "prompt": "hi", "max_tokens": 1})
        assert ok.status_code == 200, ok.text

    async def over_grpc() -> list[grpc.StatusCode]:
        codes = []
        async with grpc.aio.insecure_channel(cluster.gateway.address) as channel:
            stub = gateway_pb2_grpc.GenerationStub(channel)
            listed = await stub.ListModels(gateway_pb2.ListModelsRequest())
            assert [card.id for card in listed.models] == served
            for model in attempts:
                request = gateway_pb2.GenerateRequest(model=model, text="hi", sampling=common_pb2.SamplingParams(max_tokens=1))
                try:
                    async for _ in stub.Complete(request, timeout=30):
                        pass
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
        return codes

    assert asyncio.run(over_grpc()) == [grpc.StatusCode.NOT_FOUND] * len(attempts)
    return {"path_like_models_tried": len(attempts) * 2, "refused_not_found": refused + len(attempts), "served_models": served}


def _services_alive(cluster: Cluster) -> None:
    for service in cluster.services:
        assert service.alive, f"{service.name} died:\n{service.log_tail()}"
        service.wait_serving(10.0)


def test_fuzzed_rest_bodies_get_4xx_never_5xx(serving_cluster: Cluster, record_figures) -> None:  # type: ignore[no-untyped-def]
    figures = _rest_fuzz(serving_cluster, SHORT_EXAMPLES)
    _services_alive(serving_cluster)
    record_figures(figures)


def test_fuzzed_grpc_messages_get_invalid_argument_never_internal(serving_cluster: Cluster, record_figures) -> None:  # type: ignore[no-untyped-def]
    figures = _grpc_fuzz(serving_cluster, SHORT_EXAMPLES)
    _services_alive(serving_cluster)
    record_figures(figures)


def test_model_field_never_loads_a_path(serving_cluster: Cluster, record_figures) -> None:  # type: ignore[no-untyped-def]
    record_figures(_model_paths(serving_cluster))


@pytest.mark.slow
def test_long_fuzz_of_rest_and_grpc(serving_cluster: Cluster, record_figures) -> None:  # type: ignore[no-untyped-def]
    figures = {"rest": _rest_fuzz(serving_cluster, LONG_EXAMPLES), "grpc": _grpc_fuzz(serving_cluster, LONG_EXAMPLES)}
    _services_alive(serving_cluster)
    record_figures(figures)
