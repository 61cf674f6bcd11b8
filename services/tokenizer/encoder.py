"""Prompts to token ids: plain text, and chats rendered with the model's chat
template, with message content encoded as text.

Encoding a rendered chat as one string would turn special-token text inside a
message (a user writing `<|im_end|>\\n<|im_start|>system\\n...`) into real
control tokens, so a user could open a system turn. Here only the template's
own markers become special ids: the chat is rendered a second time with every
special-token string in the content blanked out (same length, so positions
agree), which tells the template's markers from the content's; the markers are
then swapped for private stand-ins that a copy of the tokenizer knows as those
special tokens, while the content's special-token text is no special token to
that copy. The rendered string is still encoded in one piece, so the ids equal
the model's own tokenization wherever the content holds no special-token text.

Every method is safe to call from several threads at once: the Rust
tokenizers are only read (transformers' call would toggle their
`encode_special_tokens` flag per call), and they are called through
`encode_batch`, which releases the GIL while it encodes (`encode` holds it,
so one long prompt would stall every other thread of the process).
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from tokenizers import Tokenizer

from pagewire.services.common.errors import invalid_argument

# Private-use characters: what blanks special-token text out of the content,
# and what frames the stand-ins of the template's markers.
BLANK = "\ue000"
STAND_IN_OPEN, STAND_IN_CLOSE = "\ue001", "\ue002"


@dataclass(frozen=True)
class ToolCallTurn:
    """One call an assistant turn made: arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolSpec:
    """A function offered to the model: parameters as JSON Schema text."""

    name: str
    description: str = ""
    parameters: str = ""


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str
    # Role "assistant": the calls it made; role "tool": the call it answers.
    tool_calls: tuple[ToolCallTurn, ...] = ()
    tool_call_id: str = ""


def _json_or_text(text: str) -> Any:
    """Templates render arguments and schemas as objects (tojson); text that
    is not JSON goes as it is."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _plain_copy(backend: Tokenizer) -> Tokenizer:
    """The tokenizer without truncation or padding, whose flags no other caller changes."""
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = False
    return copy


def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    (encoding,) = tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
    return encoding.ids


class PromptEncoder:
    """Encodes prompts with a transformers tokenizer that has a Rust backend."""

    def __init__(self, tokenizer: Any, model_id: str):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"the tokenizer of {model_id} has no fast (Rust) backend, which the tokenizer service needs")
        self._tokenizer = tokenizer
        self._model_id = model_id
        self._plain = _plain_copy(backend)
        specials = {token.content: token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special}
        # Longest first: at one position the longest special token matches, as in the tokenizer.
        self._specials = re.compile("|".join(re.escape(text) for text in sorted(specials, key=len, reverse=True))) if specials else None
        # A nonce no client can know keeps content from spelling a stand-in.
        nonce = secrets.token_hex(8)
        self._stand_ins = {text: f"{STAND_IN_OPEN}{nonce}:{token_id}{STAND_IN_CLOSE}" for text, token_id in specials.items()}
        self._marked, self._marked_ids = self._marked_copy(backend)

    def _marked_copy(self, backend: Tokenizer) -> tuple[Tokenizer, dict[int, int]]:
        """A copy whose special tokens are spelled as their stand-ins, and its
        ids of the added tokens -> the model's (the copy may number them anew)."""
        definition = json.loads(backend.to_str())
        for token in definition["added_tokens"]:
            token["content"] = self._stand_ins.get(token["content"], token["content"])
        marked = _plain_copy(Tokenizer.from_str(json.dumps(definition)))
        return marked, {marked.token_to_id(token["content"]): token["id"] for token in definition["added_tokens"]}

    @property
    def has_chat_template(self) -> bool:
        return bool(self._tokenizer.chat_template)

    def encode_text(self, text: str, add_special_tokens: bool) -> list[int]:
        return _encode(self._plain, text, add_special_tokens)

    def encode_chat(
        self, turns: Sequence[ChatTurn], add_generation_prompt: bool, parse_special_tokens_in_content: bool, tools: Sequence[ToolSpec] = ()
    ) -> list[int]:
        """The chat rendered with the template and encoded; RequestError when
        the template refuses it. The template's text already holds the
        model's special tokens, so none are added."""
        if not parse_special_tokens_in_content:
            self._refuse_special_text_in_tools(turns, tools)
        rendered = self._render(turns, add_generation_prompt, tools)
        if parse_special_tokens_in_content or self._specials is None or not any(self._specials.search(t.content) for t in turns):
            return _encode(self._plain, rendered, add_special_tokens=False)
        blanked_turns = [dataclasses.replace(t, content=self._specials.sub(lambda m: BLANK * len(m.group()), t.content)) for t in turns]
        blanked = self._render(blanked_turns, add_generation_prompt, tools)
        if len(blanked) != len(rendered):
            raise invalid_argument(
                f"the chat template of {self._model_id} reshapes message content that holds special-token text, so that text "
                "cannot be kept apart from the template's own markers: remove it from the messages"
            )
        pieces, end = [], 0
        for marker in self._specials.finditer(blanked):
            pieces += [rendered[end : marker.start()], self._stand_ins[marker.group()]]
            end = marker.end()
        pieces.append(rendered[end:])
        ids = _encode(self._marked, "".join(pieces), add_special_tokens=False)
        return [self._marked_ids.get(token_id, token_id) for token_id in ids]

    def _refuse_special_text_in_tools(self, turns: Sequence[ChatTurn], tools: Sequence[ToolSpec]) -> None:
        """Tool calls and definitions are rendered as they are, so special-token
        text in them would become control tokens: refused, unless the caller
        asked for special tokens in content."""
        if self._specials is None:
            return
        texts = [text for t in turns for call in t.tool_calls for text in (call.id, call.name, call.arguments)]
        texts += [t.tool_call_id for t in turns] + [text for tool in tools for text in (tool.name, tool.description, tool.parameters)]
        if any(self._specials.search(text) for text in texts):
            raise invalid_argument("tool calls and tools must not hold special-token text (such as <|im_end|>)", field="tools")

    def _render(self, turns: Sequence[ChatTurn], add_generation_prompt: bool, tools: Sequence[ToolSpec] = ()) -> str:
        conversation: list[dict[str, Any]] = []
        for turn in turns:
            message: dict[str, Any] = {"role": turn.role, "content": turn.content}
            if turn.tool_calls:
                message["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _json_or_text(c.arguments)}} for c in turn.tool_calls
                ]
            if turn.tool_call_id:
                message["tool_call_id"] = turn.tool_call_id
            conversation.append(message)
        functions = [
            {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": _json_or_text(t.parameters) if t.parameters else {}}}
            for t in tools
        ]
        try:
            return self._tokenizer.apply_chat_template(
                conversation, tools=functions or None, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except jinja2.TemplateError as exc:
            # Templates refuse chats they cannot render (roles that do not
            # alternate, a system turn) with raise_exception: the caller's to fix.
            raise invalid_argument(f"the chat template of {self._model_id} refused the messages: {exc}", field="messages") from exc
