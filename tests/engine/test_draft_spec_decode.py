"""Speculative decoding with a draft model (--speculative-method draft):
greedy output is the plain engine's token for token, with a draft that
agrees with the target everywhere (the embedded model as its own draft:
every proposal accepted) and one that mostly does not (a tiny random model
with the same vocabulary); a long prompt catches up in chunks; a draft whose
vocabulary differs is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from pagewire.services.common.model import resolve_model
from pagewire.services.engine.core.engine import EngineCore
from tests.engine import tiny_models
from tests.engine.util import assert_no_leaks, greedy, make_engine, run_all, tokens_of

MAX_TOKENS = 10


def _embedded_path() -> str:
    source = resolve_model("")
    return str(source.directory / source.gguf_file)


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory: pytest.TempPathFactory, engine_model) -> str:
    """A tiny random Llama with the embedded model's vocabulary: a poor but valid draft."""
    config = LlamaConfig(**(tiny_models.TINY | {"vocab_size": engine_model.config.vocab_size}), tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("draft")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def few_prompts(prompts) -> list[list[int]]:
    """A short, a long (several blocks) and a chat prompt."""
    return [prompts[0], prompts[8], prompts[-1]]


@pytest.fixture(scope="module")
def plain(engine_model, few_prompts) -> list[list[int]]:
    core = make_engine(engine_model)
    for i, ids in enumerate(few_prompts):
        core.add_request(f"r{i}", ids, greedy(MAX_TOKENS))
    outputs = run_all(core)
    return [tokens_of(outputs[f"r{i}"]) for i in range(len(few_prompts))]


def _run(core: EngineCore, prompts: list[list[int]]) -> list[list[int]]:
    for i, ids in enumerate(prompts):
        core.add_request(f"r{i}", ids, greedy(MAX_TOKENS))
    outputs = run_all(core)
    assert_no_leaks(core)
    assert not core.executor.draft_proposer.states, "the draft kept state of finished requests"
    return [tokens_of(outputs[f"r{i}"]) for i in range(len(prompts))]


def test_a_draft_equal_to_the_target_has_every_proposal_accepted(engine_model, few_prompts, plain) -> None:
    core = make_engine(engine_model, speculative_method="draft", draft_model=_embedded_path(), num_speculative_tokens=3)
    assert _run(core, few_prompts) == plain
    stats = core.stats()
    assert stats.spec_decode_draft_tokens_total > 0
    # Near-ties aside (the draft decodes alone, the target in a verify batch), every proposal holds.
    assert stats.spec_decode_accepted_tokens_total >= 0.9 * stats.spec_decode_draft_tokens_total


def test_a_poor_draft_changes_nothing_but_the_acceptance(engine_model, few_prompts, plain, random_draft) -> None:
    # A token budget of 16: the long prompt catches up in the draft over several steps.
    core = make_engine(engine_model, speculative_method="draft", draft_model=random_draft, num_speculative_tokens=4, max_num_batched_tokens=16)
    assert _run(core, few_prompts) == plain
    stats = core.stats()
    assert stats.spec_decode_draft_tokens_total > stats.spec_decode_accepted_tokens_total


def test_a_draft_with_another_vocabulary_is_refused(engine_model, tmp_path: Path) -> None:
    tiny_models.qwen2_tied().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="the draft must share the target's tokenizer"):
        make_engine(engine_model, speculative_method="draft", draft_model=str(tmp_path))
    with pytest.raises(ValueError, match="needs --draft-model"):
        make_engine(engine_model, speculative_method="draft")
