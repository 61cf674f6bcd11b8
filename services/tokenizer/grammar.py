"""Structured-output constraints compiled with xgrammar for this tokenizer.

The tokenizer service holds the tokenizer, so it compiles: the engine gets
the compiled grammar serialized (CompiledGrammar.serialize_json, which
leaves the vocabulary out) and loads it against its own TokenizerInfo of
the same tokenizer. Compiled grammars are kept, by a hash of the
constraint, in an LRU bounded by their serialized bytes, so a client that
repeats its schema pays for compiling it once.

JSON is compiled without free whitespace (one space after ',' and ':', as
json.dumps writes): a model allowed any whitespace can pad its answer to the
length limit.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

import xgrammar

from pagewire.services.common.errors import invalid_argument
from pagewire.services.common.limit_checks import check_constraint
from pagewire.services.common.limits import GRAMMAR_CACHE_BYTES
from pagewire.services.common.logging import get_logger
from pagewire.v1 import common_pb2

log = get_logger("tokenizer")

ANY_JSON_OBJECT = '{"type": "object"}'


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly `choices`. JSON string
    syntax is the EBNF literal syntax (backslash escapes, double quotes)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def _problem(exc: Exception) -> str:
    """xgrammar's message without its C++ source location prefix."""
    text = str(exc).strip()
    _, sep, rest = text.partition(": ")
    return rest if sep and text.startswith("[") else text


class GrammarCompiler:
    """Thread-safe: the Tokenize pool compiles side by side."""

    def __init__(self, tokenizer: Any, cache_bytes: int = GRAMMAR_CACHE_BYTES):
        self.tokenizer_info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
        self._compiler = xgrammar.GrammarCompiler(self.tokenizer_info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self._cache_bytes = 0
        self._max_cache_bytes = cache_bytes
        self._lock = threading.Lock()

    def compile(self, constraint: common_pb2.Constraint) -> str:
        """The serialized compiled grammar; RequestError (INVALID_ARGUMENT,
        naming the field and xgrammar's reason) when it does not compile."""
        check_constraint(constraint)
        key = hashlib.sha256(constraint.SerializeToString(deterministic=True)).digest()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        kind = constraint.WhichOneof("kind")
        if kind is None:
            raise invalid_argument("constraint has no kind: set json_schema, json_object, regex, choice or ebnf", field="constraint")
        try:
            serialized = self._compile(constraint, kind).serialize_json()
        except (RuntimeError, ValueError, TypeError) as exc:
            raise invalid_argument(f"constraint.{kind} does not compile: {_problem(exc)}", field=f"constraint.{kind}") from None
        self._remember(key, serialized)
        return serialized

    def _compile(self, constraint: common_pb2.Constraint, kind: str) -> xgrammar.CompiledGrammar:
        if kind == "json_schema":
            return self._compiler.compile_json_schema(constraint.json_schema, any_whitespace=False)
        if kind == "json_object":
            return self._compiler.compile_json_schema(ANY_JSON_OBJECT, any_whitespace=False)
        if kind == "regex":
            return self._compiler.compile_regex(constraint.regex)
        if kind == "choice":
            return self._compiler.compile_grammar(choice_ebnf(list(constraint.choice.choices)))
        return self._compiler.compile_grammar(constraint.ebnf)

    def _remember(self, key: bytes, serialized: str) -> None:
        size = len(serialized)
        if size > self._max_cache_bytes:
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = serialized
            self._cache_bytes += size
            while self._cache_bytes > self._max_cache_bytes:
                _, dropped = self._cache.popitem(last=False)
                self._cache_bytes -= len(dropped)
