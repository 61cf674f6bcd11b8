"""Tensor parallelism on the CPU: two ranks (this process and a worker
process, joined over gloo) give the greedy tokens of one rank and of HF
transformers, for the embedded model (9 query heads over 3 KV heads, split
unevenly) and for a random Qwen2 (biases, tied embeddings) and Llama (its
own lm_head); a size the heads cannot be split over is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.executor.model_executor import create_engine_core
from pagewire.services.engine.executor.parallel import HeadShard, Shard, head_shard, split_evenly
from tests.engine import tiny_models
from tests.engine.util import MAX_NEW_TOKENS, assert_no_leaks, greedy, run_all, tokens_of


def test_heads_are_split_by_kv_group_and_replicated_past_the_kv_heads() -> None:
    # The embedded model: 9 query heads over 3 KV heads, on 2 ranks.
    assert [head_shard(9, 3, 2, rank) for rank in range(2)] == [HeadShard(Shard(0, 6), Shard(0, 2)), HeadShard(Shard(6, 3), Shard(2, 1))]
    # Llama-3-8B's 32 over 8 on 16 ranks: each KV head on two ranks, each with half its queries.
    assert [head_shard(32, 8, 16, rank) for rank in (0, 1, 2, 15)] == [
        HeadShard(Shard(0, 2), Shard(0, 1)), HeadShard(Shard(2, 2), Shard(0, 1)), HeadShard(Shard(4, 2), Shard(1, 1)), HeadShard(Shard(30, 2), Shard(7, 1)),
    ]  # fmt: skip
    assert [split_evenly(10, 3, i) for i in range(3)] == [Shard(0, 4), Shard(4, 3), Shard(7, 3)]


@pytest.mark.parametrize(("heads", "kv_heads", "size"), [(9, 3, 4), (32, 8, 12), (4, 2, 8)])
def test_a_size_the_heads_cannot_be_split_over_is_refused(heads: int, kv_heads: int, size: int) -> None:
    with pytest.raises(ValueError, match=f"--tensor-parallel-size {size} cannot split {heads} query heads over {kv_heads} KV heads"):
        head_shard(heads, kv_heads, size, 0)


def test_the_engine_refuses_such_a_size_before_starting_a_worker() -> None:
    with pytest.raises(ValueError, match="cannot split 9 query heads over 3 KV heads"):
        create_engine_core(EngineConfig(device="cpu", tensor_parallel_size=4, num_kv_blocks=16))


def _engine(model: str, size: int, **overrides) -> Iterator[EngineCore]:
    settings = {"model": model, "device": "cpu", "tensor_parallel_size": size, "num_kv_blocks": 128, "max_model_len": 512} | overrides
    core = create_engine_core(EngineConfig(**settings))
    try:
        yield core
    finally:
        core.executor.close()


@pytest.fixture
def embedded_tp2() -> Iterator[EngineCore]:
    # A small token budget, so prompts are prefilled in chunks across steps.
    yield from _engine("", 2, max_num_batched_tokens=24)


def test_two_ranks_give_hf_greedy_tokens_for_the_embedded_model(embedded_tp2: EngineCore, prompts, hf_greedy) -> None:
    info = embedded_tp2.info
    assert info.tensor_parallel_size == 2
    # Rank 0 holds 2 of the 3 KV groups, rank 1 one; the embedding and MLP split evenly.
    assert info.weight_bytes_per_rank[0] > info.weight_bytes_per_rank[1] > 0.4 * info.weight_bytes_per_rank[0]
    for i, ids in enumerate(prompts):
        embedded_tp2.add_request(f"r{i}", ids, greedy(MAX_NEW_TOKENS))
    outputs = run_all(embedded_tp2)
    for i in range(len(prompts)):
        assert tokens_of(outputs[f"r{i}"]) == hf_greedy[i], f"prompt {i}"
    assert_no_leaks(embedded_tp2)


@pytest.mark.parametrize("architecture", ["qwen2_tied", "llama3_scaled"])
def test_two_ranks_equal_one_rank_and_hf_on_a_random_model(tmp_path: Path, architecture: str) -> None:
    hf = getattr(tiny_models, architecture)()
    hf.save_pretrained(tmp_path)
    prompts = [tiny_models.prompt(seed=seed) for seed in range(3)]
    expected = [tiny_models.hf_greedy(hf, ids, 12) for ids in prompts]
    for size in (1, 2):
        for core in _engine(str(tmp_path), size, block_size=4):
            for i, ids in enumerate(prompts):
                core.add_request(f"r{i}", ids, greedy(12, ignore_eos=True))
            outputs = run_all(core)
            assert [tokens_of(outputs[f"r{i}"]) for i in range(len(prompts))] == expected, f"tensor-parallel size {size}"
