"""Speculative decoding (--speculative-method ngram): greedy output is the
plain engine's token for token, whatever batching, chunking, preemption or
stop does to a verify step; rejected proposals leave nothing in the KV cache
or the prefix cache; sampled output keeps the target distribution."""

from __future__ import annotations

import pytest
import torch

from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.core.kv_cache import cdiv, hash_block
from pagewire.services.engine.core.proposer import NgramProposer
from pagewire.services.engine.core.sequence import FinishReason, SamplingParams
from pagewire.services.engine.executor.sampler import Sampler, SamplingRequest
from tests.engine.util import assert_no_leaks, greedy, make_engine, run_all, tokens_of

QUOTE_TOKENS = 24
PASSAGE = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow."
)
NGRAM = {"speculative_method": "ngram", "num_speculative_tokens": 4}


@pytest.fixture(scope="module")
def quote_prompt(hf_tokenizer) -> list[int]:
    """A prompt whose answer repeats a passage it holds: prompt lookup proposes most of it."""
    text = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Repeat this text exactly:\n\n{PASSAGE}"}], add_generation_prompt=True, tokenize=False
    )
    return hf_tokenizer(text)["input_ids"]


@pytest.fixture(scope="module")
def quote_plain(engine_model, quote_prompt) -> list[int]:
    """The plain engine's greedy answer, the reference of every variant."""
    core = make_engine(engine_model)
    core.add_request("q", quote_prompt, greedy(QUOTE_TOKENS))
    return tokens_of(run_all(core)["q"])


def _accepted(core: EngineCore) -> int:
    return core.stats().spec_decode_accepted_tokens_total


def _registered_hashes_are_of(core: EngineCore, sequences: list[list[int]]) -> None:
    """Every block in the prefix cache holds a prefix of one of these token lists."""
    size = core.block_size
    valid = set()
    for tokens in sequences:
        parent = None
        for start in range(0, len(tokens) - size + 1, size):
            parent = hash_block(parent, tokens[start : start + size])
            valid.add(parent)
    assert set(core.kv_cache.pool.cached) <= valid


def test_proposer_takes_the_newest_longest_match() -> None:
    proposer = NgramProposer(num_speculative_tokens=3, ngram_min=1, ngram_max=3)
    assert proposer.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3], 10) == [7, 8, 5]
    assert proposer.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3], 2) == [7, 8]
    assert proposer.propose([4, 5, 6, 5], 10) == [6, 5]  # one-token match, continuation runs into the suffix
    assert proposer.propose([1, 2, 3, 4], 10) == []
    assert NgramProposer(num_speculative_tokens=3, ngram_min=2, ngram_max=3).propose([4, 5, 6, 5], 10) == []
    with pytest.raises(ValueError, match="ngram-min"):
        NgramProposer(num_speculative_tokens=3, ngram_min=4, ngram_max=3)


def test_greedy_output_equals_plain_decoding_batched_and_chunked(
    engine_model, prompts, hf_greedy, quote_prompt, quote_plain, both_schedulings
) -> None:  # type: ignore[no-untyped-def]
    # A small step budget chunks the prefills and truncates proposals.
    core = make_engine(engine_model, **NGRAM, block_size=4, max_num_batched_tokens=24)
    core.add_request("q", quote_prompt, greedy(QUOTE_TOKENS))
    for index in (1, 3, 8):
        core.add_request(f"r{index}", prompts[index], greedy(len(hf_greedy[index])))
    outputs = run_all(core)
    assert tokens_of(outputs["q"]) == quote_plain
    for index in (1, 3, 8):
        assert tokens_of(outputs[f"r{index}"]) == hf_greedy[index], index
    stats = core.stats()
    assert stats.spec_decode_draft_tokens_total > stats.spec_decode_accepted_tokens_total >= QUOTE_TOKENS // 2
    assert stats.spec_decode_accepted_tokens_total == sum(stats.spec_decode_accepted_by_position)
    assert list(stats.spec_decode_accepted_by_position) == sorted(stats.spec_decode_accepted_by_position, reverse=True)
    assert stats.generation_tokens_total == sum(len(tokens_of(outs)) for outs in outputs.values())
    assert_no_leaks(core)
    _registered_hashes_are_of(core, [quote_prompt + quote_plain] + [prompts[i] + hf_greedy[i] for i in (1, 3, 8)])


def test_preemption_mid_speculation_leaves_output_unchanged(engine_model, quote_prompt, quote_plain) -> None:  # type: ignore[no-untyped-def]
    # Both prompts fit, but not both answers: one is preempted and recomputed.
    core = make_engine(engine_model, **NGRAM, block_size=4, num_kv_blocks=2 * cdiv(len(quote_prompt), 4) + 3, enable_prefix_caching=False)
    core.add_request("a", quote_prompt, greedy(QUOTE_TOKENS))
    core.add_request("b", quote_prompt, greedy(QUOTE_TOKENS))
    outputs = run_all(core)
    assert core.stats().num_preemptions > 0 and _accepted(core) > 0
    assert tokens_of(outputs["a"]) == tokens_of(outputs["b"]) == quote_plain
    assert_no_leaks(core)


def test_stop_and_length_inside_accepted_tokens_truncate_there(engine_model, quote_prompt, quote_plain) -> None:  # type: ignore[no-untyped-def]
    stop_token = quote_plain[9]
    core = make_engine(engine_model, **NGRAM)
    core.add_request("stop", quote_prompt, greedy(QUOTE_TOKENS, stop_token_ids=(stop_token,)))
    core.add_request("length", quote_prompt, greedy(7, logprobs=1))
    outputs = run_all(core)
    stopped, limited = outputs["stop"], outputs["length"]
    assert tokens_of(stopped) == quote_plain[: quote_plain.index(stop_token) + 1]
    assert stopped[-1].finish_reason is FinishReason.STOP and stopped[-1].matched_stop_token_id == stop_token
    assert tokens_of(limited) == quote_plain[:7] and limited[-1].finish_reason is FinishReason.LENGTH
    # One logprob per emitted token, of that token.
    assert [lp.token_id for out in limited for lp in out.logprobs] == quote_plain[:7]
    assert all(len(out.logprobs) == len(out.new_token_ids) for out in limited)
    assert _accepted(core) > 0
    assert_no_leaks(core)


def test_abort_while_a_verify_step_is_in_flight(engine_model, quote_prompt, quote_plain) -> None:  # type: ignore[no-untyped-def]
    core = make_engine(engine_model, **NGRAM)
    core.add_request("q", quote_prompt, greedy(QUOTE_TOKENS))
    core.add_request("other", quote_prompt, greedy(QUOTE_TOKENS))
    outputs: list = []
    for _ in range(QUOTE_TOKENS):
        outputs += core.step()
        if core.sequences["q"].spec_token_ids:
            break
    assert core.sequences["q"].spec_token_ids, "no verify step was launched"
    core.abort("q")
    outputs += [out for outs in run_all(core).values() for out in outs]
    aborted = [out for out in outputs if out.request_id == "q"]
    assert aborted[-1].finish_reason is FinishReason.CANCELLED
    # The verify step's tokens are dropped: what was emitted is a prefix of the answer.
    assert quote_plain[: len(tokens_of(aborted))] == tokens_of(aborted) and len(tokens_of(aborted)) < QUOTE_TOKENS
    assert tokens_of([out for out in outputs if out.request_id == "other"]) == quote_plain
    assert_no_leaks(core)


def test_requests_can_opt_out(engine_model, prompts, hf_greedy) -> None:  # type: ignore[no-untyped-def]
    core = make_engine(engine_model, **NGRAM)
    core.add_request("r", prompts[3], greedy(len(hf_greedy[3]), speculative=False))
    core.add_request("p", prompts[3], greedy(len(hf_greedy[3]), repetition_penalty=1.0001))
    assert tokens_of(run_all(core)["r"]) == hf_greedy[3]
    assert core.stats().spec_decode_draft_tokens_total == 0
    assert_no_leaks(core)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_keeps_the_target_distribution() -> None:
    """A tiny "model" whose next-token distributions are fixed per position,
    a fixed proposal of two tokens, and many sequences: the first emitted
    token follows p0, the second (after the first proposal was emitted)
    follows p1, the third p2; about half of the proposals are rejected."""
    vocab, num_seqs = 6, 6000
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=generator)
    targets = logits.softmax(-1)
    drafts = targets[:2].argmax(-1).tolist()
    params = SamplingParams(temperature=1.0)
    rows = [SamplingRequest(f"s{i}", params, [], [], draft) for i in range(num_seqs) for draft in [*drafts, None]]
    out = Sampler(seed=3, device=torch.device("cpu")).sample(logits.repeat(num_seqs, 1), rows, [3] * num_seqs).resolve()
    # 20.5: the chi-square quantile at p = 0.999 for 5 degrees of freedom.
    critical = 20.5
    for position in range(3):
        reached = [tokens[position] for tokens in out.token_ids if len(tokens) > position]
        assert len(reached) > 500
        counts = torch.bincount(torch.tensor(reached), minlength=vocab).float()
        assert _chi_square(counts, targets[position]) < critical, position
    # Emitted tokens past a position are exactly the accepted proposals.
    assert all(tokens[:-1] == drafts[: len(tokens) - 1] for tokens in out.token_ids)
