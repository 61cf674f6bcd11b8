"""Random mixes of adds, aborts and steps on a tiny random Llama with a
cache small enough to force preemption: after every step the block
accounting adds up, and at the end every block is free. Each completed
greedy request equals the same request run alone."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pagewire.services.common.model import resolve_model
from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.executor.loader import LoadedModel, load_model
from pagewire.services.engine.core.sequence import FinishReason
from tests.engine.util import assert_no_leaks, greedy, make_engine, run_all, tokens_of

# Every test here runs with overlapped steps and without.
pytestmark = pytest.mark.usefixtures("both_schedulings")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Iterator[LoadedModel]:
    # Ops this small only lose to thread synchronisation, badly so on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, eos_token_id=None,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    yield load_model(resolve_model(str(directory)), torch.device("cpu"), torch.float32)
    torch.set_num_threads(threads)


def _check_accounting(core: EngineCore) -> None:
    pool = core.kv_cache.pool
    held = Counter(block_id for seq in core.sequences.values() for block_id in seq.block_table)
    for block in pool.blocks:
        assert block.ref_count == held[block.block_id], f"block {block.block_id}"
        assert (block.block_id in pool.free_queue) == (block.ref_count == 0)
        if block.block_hash is not None:
            assert pool.cached[block.block_hash] is block
    assert len(pool.cached) == sum(1 for b in pool.blocks if b.block_hash is not None)
    assert pool.num_cached_free == sum(1 for b in pool.free_queue.values() if b.block_hash is not None)
    for seq in core.scheduler.running:
        assert len(seq.block_table) * core.block_size >= seq.num_computed_tokens
    for seq in core.scheduler.waiting:
        assert seq.num_computed_tokens == 0 and not seq.block_table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_adds_aborts_and_steps_keep_blocks_consistent(tiny_model, seed) -> None:
    rng = random.Random(seed)
    core = make_engine(tiny_model, num_kv_blocks=24, block_size=4, max_num_batched_tokens=rng.choice([6, 16, 64]), max_model_len=128, max_num_seqs=6)
    shared_prefix = [rng.randrange(128) for _ in range(12)]
    requests: dict[str, tuple[list[int], int]] = {}
    outputs: dict[str, list] = {}
    for op in range(160):
        action = rng.random()
        if action < 0.3:
            request_id = f"r{op}"
            prompt = (shared_prefix[: rng.randrange(13)] + [rng.randrange(128) for _ in range(rng.randrange(1, 20))])[:40]
            max_tokens = rng.randrange(1, 24)
            requests[request_id] = (prompt, max_tokens)
            core.add_request(request_id, prompt, greedy(max_tokens, ignore_eos=True))
        elif action < 0.4 and requests:
            core.abort(rng.choice([*requests, "unknown"]))
        else:
            for out in core.step():
                outputs.setdefault(out.request_id, []).append(out)
        _check_accounting(core)
    for request_id, outs in run_all(core).items():
        outputs.setdefault(request_id, []).extend(outs)
    assert_no_leaks(core)
    assert set(outputs) == set(requests)
    completed = [rid for rid, outs in outputs.items() if outs[-1].finish_reason is FinishReason.LENGTH]
    assert completed and core.stats().num_preemptions > 0
    alone = make_engine(tiny_model, num_kv_blocks=64, block_size=4, max_model_len=128, enable_prefix_caching=False)
    for request_id in completed:
        prompt, max_tokens = requests[request_id]
        alone.add_request(request_id, prompt, greedy(max_tokens, ignore_eos=True))
        assert tokens_of(run_all(alone)[request_id]) == tokens_of(outputs[request_id]), request_id
