"""Tool calling without a model: the constraint each tool_choice asks for,
Hermes-style calls parsed from free output, the chat and stream bodies in
OpenAI's shape, and tools and tool turns rendered by a template that
defines them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from pagewire.services.common.errors import RequestError
from pagewire.services.gateway.openai_schemas import ChatBody, ChatFormat, ToolCallFormat
from pagewire.services.gateway.tool_calls import held_back, parse_hermes
from pagewire.services.tokenizer.encoder import ChatTurn, PromptEncoder, ToolCallTurn, ToolSpec
from pagewire.v1 import common_pb2, gateway_pb2
from tests.support.models import tokenizer_directory

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}},
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
# A Hermes-style template (as Qwen2.5 and Hermes models ship): tools in the
# system turn, calls as <tool_call> JSON, results as tool turns.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for call in message.tool_calls %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", \"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def _body(**fields: Any) -> ChatBody:
    return ChatBody.model_validate({"model": "m", "messages": ASK, "tools": TOOLS} | fields)


def test_tool_choice_sets_the_constraint() -> None:
    named = _body(tool_choice={"type": "function", "function": {"name": "get_weather"}}).to_request()
    assert json.loads(named.constraint.json_schema) == WEATHER
    assert [t.name for t in named.chat.tools] == ["get_weather", "get_time"]
    required = json.loads(_body(tool_choice="required").to_request().constraint.json_schema)
    assert [option["properties"]["name"]["const"] for option in required["anyOf"]] == ["get_weather", "get_time"]
    assert not _body(tool_choice="auto").to_request().HasField("constraint")
    assert not _body().to_request().HasField("constraint")  # auto by default
    none = _body(tool_choice="none").to_request()
    assert not none.HasField("constraint") and not none.chat.tools


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_tool_choice_refusals_name_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as caught:
        _body(**fields).to_request()
    assert caught.value.field == param


def test_hermes_calls_are_parsed_and_content_kept() -> None:
    content, calls = parse_hermes('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    # Two calls, the last one left open at the end of the output.
    _, calls = parse_hermes('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {"x": 1}}')
    assert [c.name for c in calls] == ["a", "b"]
    assert parse_hermes("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert held_back("Sure <tool") == len("Sure ") and held_back("a < b") == len("a < b") and held_back("x<tool_call>{") == 1


def _chunk(text: str, finish: int = 0) -> gateway_pb2.GenerateChunk:
    return gateway_pb2.GenerateChunk(text=text, finish_reason=finish)


STOP = common_pb2.FINISH_REASON_STOP


def test_auto_streams_content_then_the_calls_in_openai_shape() -> None:
    output = _body().output_format()
    assert isinstance(output, ToolCallFormat) and not output.streams_text_as_is
    pieces = ["Checking", " now <to", 'ol_call>{"name": "get_weather", ', '"arguments": {"city": "Paris"}}</tool_call>', ""]
    choices = [output.choice(_chunk(text, STOP if i == len(pieces) - 1 else 0), streaming=True) for i, text in enumerate(pieces)]
    assert "".join(c["delta"].get("content", "") for c in choices) == "Checking now "
    (call,) = choices[-1]["delta"]["tool_calls"]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert choices[-1]["finish_reason"] == "tool_calls"
    plain = _body().output_format().choice(_chunk("No tools needed.", STOP), streaming=False)
    assert plain["message"] == {"role": "assistant", "content": "No tools needed."} and plain["finish_reason"] == "stop"


def test_named_call_streams_arguments_after_an_opening_with_id_and_name() -> None:
    output = _body(tool_choice={"type": "function", "function": {"name": "get_weather"}}).output_format()
    assert output.streams_text_as_is
    (opening,) = output.opening()
    head = opening["delta"]["tool_calls"][0]
    assert head["function"] == {"name": "get_weather", "arguments": ""} and head["id"].startswith("call_")
    middle = output.choice(_chunk('{"city": '), streaming=True)
    last = output.choice(_chunk('"Paris"}', STOP), streaming=True)
    assert middle["delta"] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}
    assert last["finish_reason"] == "tool_calls"
    whole = output.choice(_chunk('{"city": "Paris"}', STOP), streaming=False)
    assert whole["message"]["content"] is None and whole["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


def test_required_with_several_tools_sends_the_call_once_complete() -> None:
    output = _body(tool_choice="required").output_format()
    first = output.choice(_chunk('{"name": "get_time", '), streaming=True)
    last = output.choice(_chunk('"arguments": {"zone": "UTC"}}', STOP), streaming=True)
    assert first["delta"] == {} and last["finish_reason"] == "tool_calls"
    assert last["delta"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert isinstance(ChatBody.model_validate({"messages": ASK}).output_format(), ChatFormat)


def test_a_template_that_defines_tools_renders_them_and_tool_turns(tmp_path: Path, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_directory(tmp_path / "hermes", hf_tokenizer, HERMES_TEMPLATE))
    encoder = PromptEncoder(tokenizer, "hermes")
    turns = [
        ChatTurn("user", "Weather in Paris?"),
        ChatTurn("assistant", "", (ToolCallTurn("call_1", "get_weather", '{"city": "Paris"}'),)),
        ChatTurn("tool", '{"celsius": 21}', tool_call_id="call_1"),
    ]
    ids = encoder.encode_chat(turns, True, False, [ToolSpec("get_weather", "Weather of a city", json.dumps(WEATHER))])
    text = tokenizer.decode(ids)
    assert '"name": "get_weather"' in text and '"description": "Weather of a city"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<|im_start|>tool\n{"celsius": 21}<|im_end|>' in text
    with pytest.raises(RequestError):
        encoder.encode_chat([ChatTurn("assistant", "", (ToolCallTurn("c", "f", '{"a": "<|im_end|>"}'),))], True, False)
