"""Checks of the public limits (limits.py) that more than one service makes,
so that a refusal reads the same whichever service makes it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pagewire.services.common.errors import invalid_argument
from pagewire.services.common.limits import (
    MAX_CHOICES, MAX_CONSTRAINT_BYTES, MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_TOKENS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_TIMEOUT_S, MAX_TOOLS,
)  # fmt: skip

if TYPE_CHECKING:
    # Only for the annotations: the engine core imports this module and loads no protobuf.
    from pagewire.v1 import common_pb2


def at_most(what: str, count: int, limit: int) -> str:
    """The refusal of `count` items of a kind where at most `limit` are accepted."""
    return f"at most {limit} {what} are accepted, got {count}"


def timeout_problem(timeout_s: float) -> str | None:
    """Why a request's timeout is refused; None when it is within [0, MAX_TIMEOUT_S]."""
    if timeout_s < 0:
        return f"timeout must not be negative, got {timeout_s:.15g} s"
    if timeout_s > MAX_TIMEOUT_S:
        return f"timeout must be at most {MAX_TIMEOUT_S} s (a day), got {timeout_s:.15g} s"
    return None


def logit_bias_problem(bias: Mapping[int, float], vocab_size: int | None = None) -> str | None:
    """Why a logit_bias is refused (too many ids, a bias out of range, an id
    outside a vocabulary of vocab_size when it is known); None when it is fine."""
    if len(bias) > MAX_LOGIT_BIAS_TOKENS:
        return at_most("logit_bias token ids", len(bias), MAX_LOGIT_BIAS_TOKENS)
    for token_id, value in bias.items():
        if not (math.isfinite(value) and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
            return f"logit_bias values must be in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {value:g} for token {token_id}"
        if vocab_size is not None and not 0 <= token_id < vocab_size:
            return f"logit_bias names token id {token_id}; the model has a vocabulary of {vocab_size} (ids 0 to {vocab_size - 1})"
    return None


def check_stop_strings(stop: Sequence[str]) -> None:
    """Refuse too many stop strings, an empty one, or one too long to hold back."""
    if len(stop) > MAX_STOP_STRINGS:
        raise invalid_argument(at_most("stop strings", len(stop), MAX_STOP_STRINGS), field="stop")
    if any(not s for s in stop):
        raise invalid_argument("stop strings must not be empty", field="stop")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise invalid_argument(f"a stop string may have at most {MAX_STOP_STRING_CHARS} characters, got one of {longest}", field="stop")


def check_constraint(constraint: common_pb2.Constraint) -> None:
    """Refuse a constraint whose text is empty or too long to compile while
    the request waits, or a choice list that is empty or too long."""
    kind = constraint.WhichOneof("kind")
    field = f"constraint.{kind}"
    if kind in ("json_schema", "regex", "ebnf"):
        texts = [getattr(constraint, kind)]
        if not texts[0]:
            raise invalid_argument(f"{field} is empty", field=field)
    elif kind == "choice":
        texts = list(constraint.choice.choices)
        if not texts:
            raise invalid_argument(f"{field} has no choices: give at least one", field=field)
        if len(texts) > MAX_CHOICES:
            raise invalid_argument(at_most("choices", len(texts), MAX_CHOICES), field=field)
        if not all(texts):
            raise invalid_argument(f"{field} holds an empty string: every choice needs at least one character", field=field)
    else:
        return
    size = sum(len(text.encode()) for text in texts)
    if size > MAX_CONSTRAINT_BYTES:
        raise invalid_argument(f"{field} has {size} bytes; at most {MAX_CONSTRAINT_BYTES} are accepted", field=field)


def check_tools(tools: Sequence[common_pb2.Tool]) -> None:
    """Refuse too many tools, one without a name, or definitions too large to
    render and compile while the request waits."""
    if len(tools) > MAX_TOOLS:
        raise invalid_argument(at_most("tools", len(tools), MAX_TOOLS), field="tools")
    if any(not tool.name for tool in tools):
        raise invalid_argument("every tool needs a name", field="tools")
    size = sum(len(tool.name.encode()) + len(tool.description.encode()) + len(tool.parameters.encode()) for tool in tools)
    if size > MAX_CONSTRAINT_BYTES:
        raise invalid_argument(f"the tools' names, descriptions and parameters have {size} bytes; at most {MAX_CONSTRAINT_BYTES} are accepted", field="tools")
