"""Structured output through `pagewire serve` on the embedded model: the
openai client's response_format on both endpoints, the gRPC constraint, and
a constraint that does not compile failing its request alone while a
well-formed request beside it completes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest

from pagewire.services.common.limits import MAX_CONSTRAINT_BYTES
from pagewire.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.bidi_stream import BidiStream
from tests.support.harness import ServeProcess
from tests.support.schemas import PERSON

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    serve = ServeProcess(["--device", "cpu", "--max-model-len", "512", "--num-kv-blocks", "256"], log_path=tmp_path_factory.mktemp("serve") / "serve.log")
    with serve.running():
        yield serve


@pytest.fixture(scope="module")
def client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.rest_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _person_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_chat_json_schema_output_validates(client: openai.OpenAI) -> None:
    for stream in (False, True):
        if stream:
            chunks = client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=MAX_TOKENS, temperature=0, response_format=_person_format(PERSON), stream=True
            )
            parts = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in chunks if c.choices]
            text, finish = "".join(p for p, _ in parts), parts[-1][1]
        else:
            reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=MAX_TOKENS, temperature=0, response_format=_person_format(PERSON))
            text, finish = reply.choices[0].message.content or "", reply.choices[0].finish_reason
        jsonschema.validate(json.loads(text), PERSON)
        assert finish == "stop"


def test_completions_json_object_output_is_an_object(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt="A JSON object describing a cat:", max_tokens=MAX_TOKENS, temperature=0, extra_body={"response_format": {"type": "json_object"}}
    )
    assert isinstance(json.loads(reply.choices[0].text), dict)
    assert reply.choices[0].finish_reason == "stop"


def test_a_schema_that_does_not_compile_fails_alone(client: openai.OpenAI) -> None:
    def good() -> str:
        reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=MAX_TOKENS, temperature=0, response_format=_person_format(PERSON))
        return reply.choices[0].message.content or ""

    def bad(schema: dict) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=MAX_TOKENS, response_format=_person_format(schema))
        return caught.value

    with ThreadPoolExecutor(3) as pool:
        completed = pool.submit(good)
        unsupported = pool.submit(bad, {"type": "object", "properties": {"a": {"type": "strng"}}})
        too_large = pool.submit(bad, {"type": "object", "description": "x" * MAX_CONSTRAINT_BYTES})
        jsonschema.validate(json.loads(completed.result()), PERSON)
        for refused, words in ((unsupported.result(), "strng"), (too_large.result(), str(MAX_CONSTRAINT_BYTES))):
            error = refused.body["error"] if isinstance(refused.body, dict) and "error" in refused.body else refused.body
            assert error["param"] == "response_format" and words in error["message"], error


def test_grpc_constraints_and_a_bad_one_alone_on_the_stream(server: ServeProcess) -> None:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    chat = gateway_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content="Is the sky blue?")])
    requests = {
        "regex": common_pb2.Constraint(regex=r"[0-9]{3}-[a-z]{2,4}"),
        "choice": common_pb2.Constraint(choice=common_pb2.Choice(choices=["yes", "no"])),
        "ebnf": common_pb2.Constraint(ebnf='root ::= "The answer is " ("yes" | "no") "."'),
        "bad": common_pb2.Constraint(regex="(?<=a)b"),
    }
    with grpc.insecure_channel(server.grpc_target) as channel:
        stream = BidiStream(gateway_pb2_grpc.GenerationStub(channel))
        for request_id, constraint in requests.items():
            stream.start(gateway_pb2.GenerateRequest(request_id=request_id, chat=chat, sampling=sampling, constraint=constraint))
        stream.close()
        texts = dict.fromkeys(requests, "")
        last = {}
        for chunk in stream.chunks():
            texts[chunk.request_id] += chunk.text
            if chunk.finish_reason:
                last[chunk.request_id] = chunk
    assert last["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "constraint.regex" in last["bad"].error.message
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", texts["regex"]), texts
    assert texts["choice"] in ("yes", "no")
    assert re.fullmatch(r"The answer is (yes|no)\.", texts["ebnf"]), texts
    assert all(last[r].finish_reason == common_pb2.FINISH_REASON_STOP for r in ("regex", "choice", "ebnf"))


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast of a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}},
]
WEATHER_ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


def test_named_and_required_tool_calls_follow_the_parameters(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        reply = client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice=choice, max_tokens=MAX_TOKENS, temperature=0)
        (call,) = reply.choices[0].message.tool_calls or []
        assert reply.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
        schema = WEATHER if call.function.name == "get_weather" else TOOLS[1]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_streamed_tool_call_deltas_add_up_to_the_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=WEATHER_ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=MAX_TOKENS, temperature=0, stream=True,
    )  # fmt: skip
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


def test_tool_turns_and_auto_without_a_tool_template(client: openai.OpenAI) -> None:
    messages = WEATHER_ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sunny, 21 C"}'},
    ]
    # SmolLM2's template defines no tools: "auto" leaves the answer as text.
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_tool_whose_parameters_do_not_compile_is_refused_naming_tools(client: openai.OpenAI) -> None:
    broken = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "strng"}}}}}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=WEATHER_ASK, tools=broken, tool_choice=named, max_tokens=8, stream=stream)
        error = refused.value.body["error"] if isinstance(refused.value.body, dict) and "error" in refused.value.body else refused.value.body
        assert error["param"] == "tools" and "strng" in error["message"], error  # type: ignore[index]
