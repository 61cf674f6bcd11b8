"""Greedy output equals HF transformers' generate, whatever the block size,
token budget (chunked prefill on or off) and concurrency."""

from __future__ import annotations

import pytest

from pagewire.services.engine.core.sequence import FinishReason
from tests.engine.util import MAX_NEW_TOKENS, assert_no_leaks, greedy, make_engine, run_all, tokens_of

# Every test here runs with overlapped steps and without.
pytestmark = pytest.mark.usefixtures("both_schedulings")


@pytest.mark.parametrize(
    ("block_size", "max_num_batched_tokens", "prefix_caching"),
    [(16, 2048, True), (16, 7, True), (4, 2048, False), (32, 33, True)],
    ids=["bs16-whole-prompts", "bs16-chunked", "bs4-whole-prompts-no-prefix-cache", "bs32-chunked"],
)
def test_concurrent_greedy_matches_hf(engine_model, prompts, hf_greedy, block_size, max_num_batched_tokens, prefix_caching) -> None:
    core = make_engine(
        engine_model, block_size=block_size, max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=prefix_caching
    )
    # 16 concurrent requests: the prompt set, then its first prompts again.
    requests = [prompts[i % len(prompts)] for i in range(16)]
    for i, ids in enumerate(requests):
        core.add_request(f"r{i}", ids, greedy(MAX_NEW_TOKENS))
    outputs = run_all(core)
    for i in range(16):
        assert tokens_of(outputs[f"r{i}"]) == hf_greedy[i % len(prompts)], f"request r{i}"
    assert_no_leaks(core)


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 5])
def test_single_request_greedy_matches_hf(engine_model, prompts, hf_greedy, max_num_batched_tokens) -> None:
    core = make_engine(engine_model, max_num_batched_tokens=max_num_batched_tokens)
    # Short, code, long (several chunks and blocks) and chat-template prompts, one at a time.
    for i in (0, 1, 8, len(prompts) - 1):
        core.add_request(f"r{i}", prompts[i], greedy(MAX_NEW_TOKENS))
        outputs = run_all(core)
        assert tokens_of(outputs[f"r{i}"]) == hf_greedy[i]
        ended_by_eos = hf_greedy[i][-1] in engine_model.config.eos_token_ids
        assert outputs[f"r{i}"][-1].finish_reason is (FinishReason.STOP if ended_by_eos else FinishReason.LENGTH)
    assert_no_leaks(core)
