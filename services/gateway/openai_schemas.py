"""The OpenAI request and response bodies of the REST shim: the request
bodies (pydantic models, validated by FastAPI's rules) and how each becomes a
GenerateRequest, and how a request's chunks become /v1/completions and
/v1/chat/completions bodies."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from pagewire.services.common.errors import invalid_argument
from pagewire.services.common.limits import MAX_PROMPTS, MIN_OUTPUT_TOKENS
from pagewire.services.gateway.tool_calls import (
    HERMES_OPEN,
    ToolCallBody,
    ToolCalling,
    ToolChoice,
    ToolDefinition,
    call_body,
    call_delta,
    finish_reason,
    held_back,
    new_call,
)
from pagewire.v1 import common_pb2, gateway_pb2

# --- request bodies ---------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


# Integer fields are bounded by the proto field they fill (int32, uint32,
# uint64), so an out-of-range value is a 400 naming the field rather than a
# failed conversion further down.
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
# OpenAI's seed is an int64; the proto's uint64 holds its two's complement.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MODULUS = 2**64
# Strict: a float, a bool or a numeric string is not a token id.
TokenId = Annotated[StrictInt, Field(ge=0, le=UINT32_MAX)]
# OpenAI's default max_tokens on /v1/completions (chat has none: the model's
# context bounds it).
COMPLETION_DEFAULT_MAX_TOKENS = 16


class LoadLoraBody(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's fields, plus the base model when several are served)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    # A directory on the engines' hosts with adapter_config.json and adapter_model.safetensors.
    lora_path: str = Field(min_length=1)
    # The base model whose replicas load it; empty: the first model served.
    model: str = ""


class UnloadLoraBody(BaseModel):
    """POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema. `strict` is accepted either way: the
    schema is always enforced (the output is generated under its grammar)."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> common_pb2.Constraint | None:
        """The GenerateRequest constraint; None for free text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return common_pb2.Constraint(json_object=common_pb2.JsonObject())
        if self.json_schema is None:
            raise invalid_argument('response_format of type "json_schema" needs a json_schema object', field="response_format")
        # No schema: any JSON value, as OpenAI reads it.
        return common_pb2.Constraint(json_schema=json.dumps(self.json_schema.schema_ or {}))


class SamplingFields(BaseModel):
    """Fields both endpoints share. Any other field is refused naming it
    (check_fields), unless it changes nothing: a field that asks for
    something this server does not do must not be answered as if it had not
    been sent."""

    model_config = ConfigDict(extra="allow")

    # OpenAI fields that change nothing here: accepted and ignored.
    ignored: ClassVar[frozenset[str]] = frozenset({"user", "metadata", "store", "service_tier"})
    # OpenAI fields that each endpoint knows but does not implement, with the
    # values that ask for nothing (OpenAI's defaults): any other value is
    # refused naming the field.
    not_implemented: ClassVar[dict[str, tuple[Any, ...]]] = {}

    model: str = ""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX, description="-1 or 0: off")
    min_p: float | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int | None = Field(None, ge=1, le=UINT32_MAX)
    # Token id (as a JSON key, so a string) -> bias added to its logit.
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    # false: the engine does not speculate for this request (see README).
    speculative: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Structured output: json_object or json_schema (see README).
    response_format: ResponseFormat | None = None

    def check_fields(self) -> None:
        """Refuse a field that is not ignored and asks for something."""
        for name, value in (self.model_extra or {}).items():
            if name in self.ignored:
                continue
            if name not in self.not_implemented:
                raise invalid_argument(f"{name} is not a field of this endpoint; leave it out", field=name)
            if not any(value == ok and type(value) is type(ok) for ok in self.not_implemented[name]):
                raise invalid_argument(f"{name} is not supported by this server; leave it out (or set it to null)", field=name)

    def token_biases(self) -> dict[int, float]:
        """logit_bias with its keys read as token ids."""
        biases = {}
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()) or int(key) > UINT32_MAX:
                raise invalid_argument(f"logit_bias keys must be token ids (non-negative integers), got {key[:40]!r}", field="logit_bias")
            biases[int(key)] = bias
        return biases

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k if self.top_k and self.top_k > 0 else None,
            min_p=self.min_p,
            seed=None if self.seed is None else self.seed % UINT64_MODULUS,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            max_tokens=max_tokens,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            n=self.n,
            speculative=self.speculative,
            logit_bias=self.token_biases(),
        )

    def generate_request(self, max_tokens: int | None, logprobs: int | None) -> gateway_pb2.GenerateRequest:
        self.check_fields()
        request = gateway_pb2.GenerateRequest(
            model=self.model,
            sampling=self.sampling(max_tokens, logprobs),
            stop=[self.stop] if isinstance(self.stop, str) else (self.stop or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
        )
        if self.skip_special_tokens is not None:
            request.skip_special_tokens = self.skip_special_tokens
        if self.response_format is not None and (constraint := self.response_format.constraint()) is not None:
            request.constraint.CopyFrom(constraint)
        return request

    def constraint_param(self) -> str:
        """The field a refusal of the request's constraint names."""
        return "response_format"

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(SamplingFields):
    not_implemented: ClassVar[dict[str, tuple[Any, ...]]] = SamplingFields.not_implemented | {"suffix": (None, ""), "best_of": (None, 1)}

    # Tried in order, token ids before strings: a smart-mode union validates
    # a long id list against every alternative and keeps an error per item.
    prompt: str | list[TokenId] | list[list[TokenId]] | list[str] = Field(union_mode="left_to_right")
    # null, as clients that send every field write an unset one, is the default too.
    max_tokens: int | None = Field(None, ge=MIN_OUTPUT_TOKENS, le=UINT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=UINT32_MAX)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the body: one string or token-id list, or a list of them."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) > MAX_PROMPTS:
                raise invalid_argument(f"at most {MAX_PROMPTS} prompts per request are accepted, got {len(prompt)}", field="prompt")
            return list(prompt)  # type: ignore[arg-type]
        return [prompt]  # type: ignore[list-item]

    def to_requests(self) -> list[gateway_pb2.GenerateRequest]:
        """One request per prompt, alike but for their input (choices.py runs them together)."""
        prompts = self.prompts()
        if self.echo and self.logprobs is not None:
            # Prompt logprobs would need the engine to score the prompt.
            raise invalid_argument("echo cannot be combined with logprobs (prompt logprobs are not returned); leave one out", field="echo")
        if self.echo and not all(isinstance(prompt, str) for prompt in prompts):
            raise invalid_argument("echo needs a text prompt; a prompt of token ids cannot be echoed", field="echo")
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        template = self.generate_request(max_tokens, self.logprobs)
        requests = []
        for prompt in prompts:
            request = gateway_pb2.GenerateRequest()
            request.CopyFrom(template)
            if isinstance(prompt, str):
                request.text = prompt
            else:
                # Non-negative already: TokenId's bounds are checked as the body is validated.
                request.token_ids.ids.extend(prompt)
            requests.append(request)
        return requests

    def output_format(self) -> CompletionFormat:
        """The response bodies: one choice per prompt and completion, each
        opening with its prompt when echo is set."""
        prompts = self.prompts()
        return CompletionFormat(len(prompts) * (self.n or 1), [str(p) for p in prompts] if self.echo else None)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatTurn(BaseModel):
    role: str
    content: str | list[TextPart] | None = None
    # An assistant turn's calls, and a tool turn's answered call.
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def message(self) -> common_pb2.ChatMessage:
        calls = [common_pb2.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in self.tool_calls or []]
        return common_pb2.ChatMessage(role=self.role, content=self.text(), tool_calls=calls, tool_call_id=self.tool_call_id or "")


class ChatBody(SamplingFields):
    # A constrained call is one call; "auto" returns every call the model writes.
    ignored: ClassVar[frozenset[str]] = SamplingFields.ignored | {"parallel_tool_calls"}
    not_implemented: ClassVar[dict[str, tuple[Any, ...]]] = SamplingFields.not_implemented | {
        "functions": (None, []),
        "function_call": (None, "none", "auto"),
        "modalities": (None, ["text"]),
        "audio": (None,),
        "prediction": (None,),
        "web_search_options": (None,),
        "reasoning_effort": (None,),
    }

    messages: list[ChatTurn]
    max_tokens: int | None = Field(None, ge=MIN_OUTPUT_TOKENS, le=UINT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=MIN_OUTPUT_TOKENS, le=UINT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=UINT32_MAX)
    # An extension: special-token text in message content becomes special
    # tokens only when the caller asks (ChatInput.parse_special_tokens_in_content).
    parse_special_tokens_in_content: bool = False
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None

    def tool_calling(self) -> ToolCalling | None:
        return ToolCalling.of(self.tools, self.tool_choice)

    def output_format(self) -> ChatFormat:
        calling, choices = self.tool_calling(), self.n or 1
        return ChatFormat(choices) if calling is None else ToolCallFormat(calling, choices)

    def to_requests(self) -> list[gateway_pb2.GenerateRequest]:
        return [self.to_request()]

    def constraint_param(self) -> str:
        calling = self.tool_calling()
        # A call's constraint is the schema of the tools' parameters.
        return "tools" if calling is not None and calling.constraint() is not None else "response_format"

    def to_request(self) -> gateway_pb2.GenerateRequest:
        top = (self.top_logprobs or 0) if self.logprobs else None
        request = self.generate_request(self.max_completion_tokens or self.max_tokens, top)
        request.chat.messages.extend(turn.message() for turn in self.messages)
        if (calling := self.tool_calling()) is not None:
            request.chat.tools.extend(calling.proto_tools())
            if (constraint := calling.constraint()) is not None:
                if request.HasField("constraint"):
                    raise invalid_argument("response_format cannot be combined with a tool_choice that asks for a call", field="response_format")
                request.constraint.CopyFrom(constraint)
        if not self.messages:
            request.chat.SetInParent()
        request.chat.parse_special_tokens_in_content = self.parse_special_tokens_in_content
        return request


def public_param(field: str | None, constraint_param: str = "response_format") -> str | None:
    """The REST field behind a GenerateRequest field that a refusal names:
    the constraint comes from `constraint_param` (response_format, or tools
    when a tool_choice asks for a call)."""
    if field is not None and field.split(".")[0] == "constraint":
        return constraint_param
    return field


# --- responses --------------------------------------------------------------

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "abort",
    common_pb2.FINISH_REASON_TIME_LIMIT: "time_limit",
}


def usage_body(usage: common_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def _finish_reason(chunk: gateway_pb2.GenerateChunk) -> str | None:
    return FINISH_REASONS.get(chunk.finish_reason)


class CompletionFormat:
    """/v1/completions bodies."""

    object_name = "text_completion"
    chunk_object_name = "text_completion"
    # Each text chunk's event is the same around its text (sse.py builds it
    # once); false for formats that hold text back.
    streams_text_as_is = True

    def __init__(self, choices: int = 1, echo: list[str] | None = None) -> None:
        """`choices`: how many the response has (prompts times n); `echo`:
        each prompt's text, which opens the text of each of its choices."""
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.choices = choices
        self.text_offsets = [0] * choices
        per_prompt = choices // len(echo) if echo else 1
        # Echoes not sent yet, by choice index.
        self._echo = {index: echo[index // per_prompt] for index in range(choices)} if echo else {}

    def text_as_is(self, index: int) -> bool:
        """Whether a text chunk of choice `index` can use the event template
        of sse.py (built for choice 0, its text as the chunk's)."""
        return self.streams_text_as_is and index == 0 and index not in self._echo

    def text(self, chunk: gateway_pb2.GenerateChunk) -> str:
        """The chunk's text, after its choice's echo on the choice's first."""
        return self._echo.pop(chunk.index, "") + chunk.text

    def logprobs(self, chunk: gateway_pb2.GenerateChunk) -> dict[str, Any] | None:
        if not chunk.logprobs:
            return None
        offsets = []
        for lp in chunk.logprobs:
            offsets.append(self.text_offsets[chunk.index])
            self.text_offsets[chunk.index] += len(lp.token)
        return {
            "tokens": [lp.token for lp in chunk.logprobs],
            "token_logprobs": [lp.logprob for lp in chunk.logprobs],
            "top_logprobs": [{top.token: top.logprob for top in lp.top_logprobs} for lp in chunk.logprobs],
            "text_offset": offsets,
        }

    def choice(self, chunk: gateway_pb2.GenerateChunk, streaming: bool) -> dict[str, Any]:
        return {"index": chunk.index, "text": self.text(chunk), "logprobs": self.logprobs(chunk), "finish_reason": _finish_reason(chunk)}

    def opening(self) -> list[dict[str, Any]]:
        return []


class ChatFormat(CompletionFormat):
    """/v1/chat/completions bodies."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, choices: int = 1) -> None:
        super().__init__(choices)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"

    def logprobs(self, chunk: gateway_pb2.GenerateChunk) -> dict[str, Any] | None:
        if not chunk.logprobs:
            return None

        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {
            "content": [
                {**entry(lp.token, lp.logprob), "top_logprobs": [entry(top.token, top.logprob) for top in lp.top_logprobs]} for lp in chunk.logprobs
            ]
        }

    def choice(self, chunk: gateway_pb2.GenerateChunk, streaming: bool) -> dict[str, Any]:
        content = {"content": chunk.text} if chunk.text or not streaming else {}
        key = "delta" if streaming else "message"
        body = {"role": "assistant", **content} if not streaming else content
        return {"index": chunk.index, key: body, "logprobs": self.logprobs(chunk), "finish_reason": _finish_reason(chunk)}

    def opening(self) -> list[dict[str, Any]]:
        return [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for index in range(self.choices)]


class ToolCallFormat(ChatFormat):
    """Chat bodies of a request that may call tools (tool_calls.py). A named
    call streams as argument deltas after an opening that carries its id and
    name; the other modes hold the output back until it is complete
    ("auto" streams the content before a call as it comes)."""

    def __init__(self, calling: ToolCalling, choices: int = 1):
        super().__init__(choices)
        self.calling = calling
        self.streams_text_as_is = calling.mode == "named"
        # Per choice: the named call, the text so far and how much of it was sent.
        self._calls = [new_call(calling.name, "") for _ in range(choices)] if calling.mode == "named" else []
        self._text = [""] * choices
        self._sent = [0] * choices

    def opening(self) -> list[dict[str, Any]]:
        if not self._calls:
            return super().opening()
        return [
            {"index": index, "delta": {"role": "assistant", "content": None, "tool_calls": [call_delta(0, call)]}, "logprobs": None, "finish_reason": None}
            for index, call in enumerate(self._calls)
        ]

    def choice(self, chunk: gateway_pb2.GenerateChunk, streaming: bool) -> dict[str, Any]:
        if not streaming:
            content, calls = self.calling.calls(chunk.text)
            message: dict[str, Any] = {"role": "assistant", "content": (content or None) if calls else chunk.text}
            if calls:
                message["tool_calls"] = [call_body(call) for call in calls]
            return {"index": chunk.index, "message": message, "logprobs": self.logprobs(chunk), "finish_reason": finish_reason(chunk, _finish_reason(chunk), bool(calls))}
        delta: dict[str, Any] = {}
        index = chunk.index
        called = bool(self._calls)
        if self._calls:
            if chunk.text:
                delta["tool_calls"] = [{"index": 0, "function": {"arguments": chunk.text}}]
        else:
            self._text[index] += chunk.text
            text = self._text[index]
            end = held_back(text) if self.calling.mode == "auto" else 0
            calls = []
            if chunk.finish_reason:
                content, calls = self.calling.calls(text)
                end = text.find(HERMES_OPEN) if calls and self.calling.mode == "auto" else (0 if calls else len(text))
            if end > self._sent[index]:
                delta["content"] = text[self._sent[index] : end]
                self._sent[index] = end
            if calls:
                delta["tool_calls"] = [call_delta(i, call) for i, call in enumerate(calls)]
            called = bool(calls)
        return {"index": index, "delta": delta, "logprobs": self.logprobs(chunk), "finish_reason": finish_reason(chunk, _finish_reason(chunk), called)}


def merge_chunks(chunks: list[gateway_pb2.GenerateChunk]) -> gateway_pb2.GenerateChunk:
    """All chunks of one choice as one (repeated fields concatenated; the last
    chunk's finish reason, matched stop and usage)."""
    merged = gateway_pb2.GenerateChunk()
    for chunk in chunks:
        merged.MergeFrom(chunk)
    merged.text = "".join(chunk.text for chunk in chunks)
    return merged


def merge_choices(chunks: list[gateway_pb2.GenerateChunk]) -> tuple[list[gateway_pb2.GenerateChunk], gateway_pb2.GenerateChunk | None]:
    """The chunks of a request as one per choice, by index, and the chunk
    that carries the request's error (None when it has none)."""
    by_index: dict[int, list[gateway_pb2.GenerateChunk]] = {}
    for chunk in chunks:
        if chunk.error.code:
            return [], chunk
        by_index.setdefault(chunk.index, []).append(chunk)
    return [merge_chunks(by_index[index]) for index in sorted(by_index)], None
