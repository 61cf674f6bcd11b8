"""Constraints compiled by the tokenizer service: every kind compiles and
loads against the same tokenizer, a repeated constraint comes from the
cache, and a bad or oversized one is refused naming its field while the
requests beside it are answered."""

from __future__ import annotations

import json

import grpc
import pytest
import xgrammar

from pagewire.services.common.errors import RequestError
from pagewire.services.common.limits import MAX_CHOICES, MAX_CONSTRAINT_BYTES
from pagewire.services.tokenizer.grammar import GrammarCompiler, choice_ebnf
from pagewire.services.tokenizer.servicer import TokenizerServicer
from pagewire.v1 import common_pb2, tokenizer_pb2

SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]})


@pytest.fixture(scope="module")
def compiler(hf_tokenizer) -> GrammarCompiler:
    return GrammarCompiler(hf_tokenizer)


def _accepts(compiler: GrammarCompiler, serialized: str, text: str) -> bool:
    grammar = xgrammar.CompiledGrammar.deserialize_json(serialized, compiler.tokenizer_info)
    matcher = xgrammar.GrammarMatcher(grammar)
    return matcher.accept_string(text) and matcher.is_completed()


@pytest.mark.parametrize(
    ("constraint", "good", "bad"),
    [
        (common_pb2.Constraint(json_schema=SCHEMA), '{"name": "Ann", "age": 3}', '{"name": "Ann"}'),
        (common_pb2.Constraint(json_object=common_pb2.JsonObject()), '{"a": [1, 2]}', "[1]"),
        (common_pb2.Constraint(regex=r"\d{3}-[a-z]+"), "123-abc", "12-abc"),
        (common_pb2.Constraint(choice=common_pb2.Choice(choices=["yes", 'say "no"\n'])), 'say "no"\n', "maybe"),
        (common_pb2.Constraint(ebnf='root ::= "a" root | "b"'), "aab", "ba"),
    ],
)
def test_each_kind_compiles_to_its_language(compiler: GrammarCompiler, constraint, good: str, bad: str) -> None:
    serialized = compiler.compile(constraint)
    assert _accepts(compiler, serialized, good)
    assert not _accepts(compiler, serialized, bad)


def test_json_allows_no_padding_whitespace(compiler: GrammarCompiler) -> None:
    serialized = compiler.compile(common_pb2.Constraint(json_schema=SCHEMA))
    assert not _accepts(compiler, serialized, '{"name": "Ann",   "age": 3}')
    assert not _accepts(compiler, serialized, '{\n"name": "Ann", "age": 3}')


def test_a_repeated_constraint_comes_from_the_cache(compiler: GrammarCompiler) -> None:
    constraint = common_pb2.Constraint(regex="[0-9]+z")
    assert compiler.compile(constraint) is compiler.compile(constraint)


def test_choice_grammar_escapes_quotes_and_backslashes() -> None:
    assert choice_ebnf(['a"b', "c\\d"]) == 'root ::= "a\\"b" | "c\\\\d"'


@pytest.mark.parametrize(
    ("constraint", "field", "words"),
    [
        (common_pb2.Constraint(json_schema='{"type": "strng"}'), "constraint.json_schema", "strng"),
        (common_pb2.Constraint(json_schema="not json"), "constraint.json_schema", "parse JSON"),
        (common_pb2.Constraint(regex="(?<=a)b"), "constraint.regex", "Lookbehind"),
        (common_pb2.Constraint(ebnf="root ::= missing"), "constraint.ebnf", "missing"),
        (common_pb2.Constraint(json_schema="x" * (MAX_CONSTRAINT_BYTES + 1)), "constraint.json_schema", str(MAX_CONSTRAINT_BYTES)),
        (common_pb2.Constraint(choice=common_pb2.Choice(choices=["a"] * (MAX_CHOICES + 1))), "constraint.choice", str(MAX_CHOICES)),
        (common_pb2.Constraint(choice=common_pb2.Choice()), "constraint.choice", "no choices"),
        (common_pb2.Constraint(regex=""), "constraint.regex", "empty"),
    ],
)
def test_a_bad_constraint_is_refused_naming_its_field(compiler: GrammarCompiler, constraint, field: str, words: str) -> None:
    with pytest.raises(RequestError) as caught:
        compiler.compile(constraint)
    assert caught.value.field == field
    assert words in caught.value.message


def test_servicer_returns_the_grammar_and_refuses_a_bad_one_alone(hf_tokenizer, model_source) -> None:
    servicer = TokenizerServicer(hf_tokenizer, model_source.model_id)
    good = servicer.tokenize_result(tokenizer_pb2.TokenizeRequest(request_id="a", text="Hi", constraint=common_pb2.Constraint(regex="[ab]+")))
    only_grammar = servicer.tokenize_result(tokenizer_pb2.TokenizeRequest(request_id="b", constraint=common_pb2.Constraint(regex="[ab]+")))
    bad = servicer.tokenize_result(tokenizer_pb2.TokenizeRequest(request_id="c", text="Hi", constraint=common_pb2.Constraint(regex="(a")))
    assert good.token_ids and good.compiled_grammar and not good.error.code
    assert not only_grammar.token_ids and only_grammar.compiled_grammar == good.compiled_grammar
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "constraint.regex" in bad.error.message
