"""OpenAI tool calling on /v1/chat/completions.

tool_choice "required" or a named function constrains the output to a call:
with one function to call, to its parameters' JSON Schema (the output is the
arguments object, streamed as argument deltas); with several, to
{"name": ..., "arguments": ...} for any of them (the call goes out once
complete). "auto" leaves the output free and parses the calls the model
writes in the Hermes format, <tool_call>{"name": ..., "arguments": ...}</tool_call>,
which chat templates that define tools teach it; text before the first call
is the message content. A call ends the request with finish_reason
"tool_calls".
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from pagewire.services.common.errors import invalid_argument
from pagewire.v1 import common_pb2, gateway_pb2

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
# A call the model closed, or the last one it left open when it stopped.
HERMES_CALL = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(HERMES_CLOSE) + r"|$)", re.DOTALL)
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    # Accepted either way: a constrained call always follows the schema.
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(BaseModel):
    name: str
    arguments: str


class ToolCallBody(BaseModel):
    """A call of an earlier assistant turn, sent back in the messages."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text of an object
    id: str


def new_call(name: str, arguments: Any) -> Call:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return Call(name, text, f"call_{uuid.uuid4().hex[:24]}")


def parse_hermes(text: str) -> tuple[str, list[Call]]:
    """The content before the first call and the calls the text holds; a
    block that is not a JSON object with a name stays in the content."""
    calls = []
    for match in HERMES_CALL.finditer(text):
        try:
            payload = json.loads(match.group(1))
        except ValueError:
            continue
        if isinstance(payload, dict) and isinstance(payload.get("name"), str):
            calls.append(new_call(payload["name"], payload.get("arguments", {})))
    if not calls:
        return text, []
    return text[: text.find(HERMES_OPEN)].strip(), calls


def held_back(text: str) -> int:
    """Where content must stop being streamed: at a call's opening tag, or
    at a tail that may be the start of one."""
    start = text.find(HERMES_OPEN)
    if start >= 0:
        return start
    for size in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
        if HERMES_OPEN.startswith(text[-size:]):
            return len(text) - size
    return len(text)


@dataclass(frozen=True)
class ToolCalling:
    """How one chat request calls its tools: "named" (one function, the
    output is its arguments), "required" (any of several, the output is a
    name and arguments) or "auto"."""

    tools: list[ToolDefinition]
    mode: str
    name: str = ""

    @classmethod
    def of(cls, tools: list[ToolDefinition] | None, choice: ToolChoice | None) -> ToolCalling | None:
        if isinstance(choice, NamedToolChoice) or choice == "required":
            if not tools:
                raise invalid_argument("tool_choice asks for a call but the request has no tools", field="tool_choice")
        if not tools or choice == "none":
            return None
        names = [tool.function.name for tool in tools]
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise invalid_argument(f"tool_choice names {choice.function.name!r}, which is not one of the tools ({', '.join(names)})", field="tool_choice")
            return cls(tools, "named", choice.function.name)
        if choice == "required":
            return cls(tools, "named", names[0]) if len(tools) == 1 else cls(tools, "required")
        return cls(tools, "auto")

    def proto_tools(self) -> list[common_pb2.Tool]:
        return [
            common_pb2.Tool(
                name=tool.function.name,
                description=tool.function.description or "",
                parameters=json.dumps(tool.function.parameters) if tool.function.parameters is not None else "",
            )
            for tool in self.tools
        ]

    def constraint(self) -> common_pb2.Constraint | None:
        if self.mode == "auto":
            return None
        schemas = {tool.function.name: tool.function.parameters or NO_PARAMETERS for tool in self.tools}
        if self.mode == "named":
            return common_pb2.Constraint(json_schema=json.dumps(schemas[self.name]))
        calls = [
            {"type": "object", "properties": {"name": {"const": name}, "arguments": schema}, "required": ["name", "arguments"], "additionalProperties": False}
            for name, schema in schemas.items()
        ]
        return common_pb2.Constraint(json_schema=json.dumps({"anyOf": calls}))

    def calls(self, text: str) -> tuple[str, list[Call]]:
        """The content and the calls of a whole output."""
        if self.mode == "named":
            return "", [new_call(self.name, text)]
        if self.mode == "required":
            try:
                payload = json.loads(text)
                return "", [new_call(payload["name"], payload["arguments"])]
            except (ValueError, KeyError, TypeError):
                return text, []  # cut off by max_tokens
        return parse_hermes(text)


def call_delta(index: int, call: Call) -> dict[str, Any]:
    return {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def call_body(call: Call) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def finish_reason(chunk: gateway_pb2.GenerateChunk, reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and chunk.finish_reason == common_pb2.FINISH_REASON_STOP else reason
