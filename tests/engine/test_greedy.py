"""Greedy output equals HF transformers' generate, whatever the block size,
token budget (chunked prefill on or off) and concurrency."""

from __future__ import annotations

import pytest

from tests.engine.conftest import MAX_NEW_TOKENS
from tests.engine.util import assert_no_leaks, greedy, make_engine, run_all, tokens_of


@pytest.mark.parametrize(
    ("block_size", "max_num_batched_tokens"),
    [(16, 2048), (16, 7), (4, 2048), (32, 33)],
    ids=["bs16-whole-prompts", "bs16-chunked", "bs4-whole-prompts", "bs32-chunked"],
)
def test_concurrent_greedy_matches_hf(engine_model, prompts, hf_greedy, block_size, max_num_batched_tokens) -> None:
    core = make_engine(engine_model, block_size=block_size, max_num_batched_tokens=max_num_batched_tokens)
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
    for i, ids in enumerate(prompts):
        core.add_request(f"r{i}", ids, greedy(MAX_NEW_TOKENS))
        outputs = run_all(core)
        assert tokens_of(outputs[f"r{i}"]) == hf_greedy[i]
        final = outputs[f"r{i}"][-1]
        assert final.finish_reason is not None
    assert_no_leaks(core)
