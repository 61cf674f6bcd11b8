"""--kv-cache-dtype fp8 on the CPU: the reference writes K/V divided by their
scale and saturated to E4M3, attention reads them back times the scale (the
batched CPU attention equals the reference), and the engine sizes twice the
blocks of a bfloat16 cache in the same memory and reports its KV dtype."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pagewire.kernels import cpu_attention, reference
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.executor.model_executor import create_engine_core
from tests.engine.util import assert_no_leaks, greedy, run_all, tokens_of

FP8 = torch.float8_e4m3fn


def _paged_batch(kv_dtype: torch.dtype, k_scale: float, v_scale: float) -> tuple[tuple, dict]:
    """A mixed step (decodes, prefill chunks, an empty sequence) whose K/V went
    through reshape_and_cache into a cache of kv_dtype."""
    generator = torch.Generator().manual_seed(0)
    query_lens, context_lens = [1, 12, 1, 0, 30], [40, 12, 7, 0, 95]
    block_size, num_heads, num_kv_heads, head_dim = 4, 8, 2, 32
    num_blocks = sum(-(-n // block_size) for n in context_lens)
    tables = torch.randperm(num_blocks, generator=generator, dtype=torch.int32)
    block_tables = torch.zeros(len(context_lens), 25, dtype=torch.int32)
    used = 0
    slots = []
    for seq, length in enumerate(context_lens):
        count = -(-length // block_size)
        block_tables[seq, :count] = tables[used : used + count]
        used += count
        slots += [int(block_tables[seq, p // block_size]) * block_size + p % block_size for p in range(length)]
    key_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=kv_dtype)
    value_cache = torch.zeros_like(key_cache)
    keys = 3 * torch.randn(len(slots), num_kv_heads, head_dim, generator=generator)
    values = torch.randn(len(slots), num_kv_heads, head_dim, generator=generator)
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    reference.reshape_and_cache(keys, values, key_cache, value_cache, torch.tensor(slots), **scales)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    args = (query, key_cache, value_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32), starts, head_dim**-0.5)
    return args, scales


def test_fp8_cache_stores_scaled_saturated_values() -> None:
    key = torch.tensor([[[1.0, -3.0, 1000.0, -5000.0]]])
    key_cache = torch.zeros(2, 2, 1, 4, dtype=FP8)
    value_cache = torch.zeros_like(key_cache)
    reference.reshape_and_cache(key, key, key_cache, value_cache, torch.tensor([3]), k_scale=2.0, v_scale=1.0)
    assert key_cache[1, 1, 0].float().tolist() == [0.5, -1.5, 448.0, -448.0]
    assert value_cache[1, 1, 0].float().tolist() == [1.0, -3.0, 448.0, -448.0]
    assert reference.from_cache(key_cache[1, 1], 2.0).tolist() == [[1.0, -3.0, 896.0, -896.0]]


@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.05, 0.02)])
def test_cpu_attention_reads_an_fp8_cache_as_the_reference(k_scale: float, v_scale: float) -> None:
    args, scales = _paged_batch(FP8, k_scale, v_scale)
    torch.testing.assert_close(cpu_attention.paged_attention(*args, **scales), reference.paged_attention(*args, **scales), rtol=1e-5, atol=1e-5)


def test_fp8_attention_stays_close_to_a_float_cache() -> None:
    fp8_args, scales = _paged_batch(FP8, 0.05, 0.02)
    float_args, _ = _paged_batch(torch.float32, 1.0, 1.0)
    exact = reference.paged_attention(*float_args)
    approximate = reference.paged_attention(*fp8_args, **scales)
    # Measured 0.052: E4M3 keeps 3 mantissa bits of each K and V element.
    assert (approximate - exact).norm() / exact.norm() < 0.08


def test_engine_doubles_blocks_with_an_fp8_cache_and_reports_it(tmp_path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    settings = dict(model=str(tmp_path), device="cpu", dtype="bfloat16", kv_cache_memory=1 << 20, block_size=4, max_num_batched_tokens=16)
    bf16 = create_engine_core(EngineConfig(**settings))
    fp8 = create_engine_core(EngineConfig(**settings, kv_cache_dtype="fp8"))
    assert (bf16.info.kv_cache_dtype, fp8.info.kv_cache_dtype) == ("bfloat16", "fp8")
    assert fp8.info.num_kv_blocks == 2 * bf16.info.num_kv_blocks
    prompt = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    fp8.add_request("r", prompt, greedy(8, ignore_eos=True))
    assert len(tokens_of(run_all(fp8)["r"])) == 8
    assert_no_leaks(fp8)
