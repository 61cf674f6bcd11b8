"""With a sliding attention window, the blocks that slide wholly out of it go
back to the pool while a sequence runs: concurrent long generations fit in a
pool far smaller than their contexts, other sequences reuse those blocks, and
every output stays HF's, prefix-cache hits on blocks that slid out
included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.kv_cache import SLID_OUT
from pagewire.services.engine.executor.model_executor import create_engine_core
from tests.engine import tiny_models
from tests.engine.util import assert_no_leaks, greedy, tokens_of

BLOCK_SIZE = 4
MAX_NEW_TOKENS = 60
NUM_REQUESTS = 3
# Most blocks a decoding sequence may hold: its window, one partly slid block and the one it writes.
MOST_HELD = tiny_models.WINDOW // BLOCK_SIZE + 2


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreTrainedModel]:
    torch.manual_seed(0)
    model = tiny_models.mistral_window().eval()
    path = tmp_path_factory.mktemp("mistral")
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_long_generations_hold_only_their_window(mistral: tuple[Path, PreTrainedModel], async_scheduling: bool) -> None:
    path, model = mistral
    prompts = [tiny_models.prompt(seed=seed) for seed in range(NUM_REQUESTS)]
    # Without freeing, each request would need (40 + 60) / 4 = 25 blocks.
    num_blocks = NUM_REQUESTS * (MOST_HELD + 1)
    core = create_engine_core(
        EngineConfig(
            model=str(path), device="cpu", num_kv_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_batched_tokens=BLOCK_SIZE * NUM_REQUESTS,
            async_scheduling=async_scheduling,
        )
    )  # fmt: skip
    for i, ids in enumerate(prompts):
        core.add_request(f"r{i}", ids, greedy(MAX_NEW_TOKENS, ignore_eos=True))
    outputs: dict[str, list] = {}
    most_held = 0
    while core.has_unfinished():
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
        # Sequences whose last step was a decode (a prefill chunk holds its own tokens' blocks too).
        decoding = [seq for seq in core.scheduler.running if seq.num_computed_tokens > seq.num_prompt_tokens]
        most_held = max([most_held, *(sum(b != SLID_OUT for b in seq.block_table) for seq in decoding)])
    assert core.scheduler.num_preemptions == 0
    assert most_held <= MOST_HELD
    expected = [tiny_models.hf_greedy(model, ids, MAX_NEW_TOKENS) for ids in prompts]
    assert [tokens_of(outputs[f"r{i}"]) for i in range(NUM_REQUESTS)] == expected
    assert_no_leaks(core)


def test_prefix_hits_on_blocks_that_slid_out(mistral: tuple[Path, PreTrainedModel]) -> None:
    """A finished request's leading blocks slid out of its window and went
    back to the pool with their hashes: the same prompt again hits them, and
    adopts only the hits inside its first query's window."""
    path, model = mistral
    core = create_engine_core(EngineConfig(model=str(path), device="cpu", num_kv_blocks=64, block_size=BLOCK_SIZE, async_scheduling=False))
    prompt = tiny_models.prompt()
    expected = tiny_models.hf_greedy(model, prompt, 20)
    for request_id in ("first", "again"):
        core.add_request(request_id, prompt, greedy(20, ignore_eos=True))
        outputs = core.step()
        if request_id == "again":
            (seq,) = core.scheduler.running
            # 9 full blocks hit (the last prompt token is computed); those before position 36 - 14 + 1 are not adopted.
            assert seq.block_table[:5] == [SLID_OUT] * 5 and SLID_OUT not in seq.block_table[5:]
        while core.has_unfinished():
            outputs += core.step()
        assert tokens_of(outputs) == expected, request_id
    assert core.kv_cache.hit_tokens == 36
    assert_no_leaks(core)
