"""The CPU attention (kernels/cpu_attention.py) equals the reference over
random block tables: decode-only steps at ragged lengths, mixed steps with
prefill chunks and padding sequences, GQA and plain multi-head layouts, as
one padded batch and split into groups past the padding budget, with and
without a sliding window, over float32 and bfloat16 caches whose sequences
own scattered or consecutive blocks; and the same results whether the
scratch buffers it gathers into are kept between calls or not; and a step's
plan reused by its later layers only while their metadata is the same."""

from __future__ import annotations

import pytest
import torch

from pagewire.kernels import cpu_attention, reference

BATCHES = {
    "decodes": ([1] * 7, [1, 2, 16, 17, 33, 100, 250]),
    "mixed": ([1, 12, 1, 0, 30, 1], [40, 12, 7, 0, 95, 64]),
    "one-decode": ([1, 9], [20, 9]),
}


# float32 at the tolerance the batched attention has always met; bfloat16 at
# one rounding of the output (both attend in float32 over the same values).
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}


def _step_args(
    query_lens: list[int], context_lens: list[int], block_size: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype, consecutive: bool, seed: int
) -> tuple:
    """reference.paged_attention's positional arguments for one step over a random cache."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = 32
    blocks_per_seq = [(n + block_size - 1) // block_size for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    # Padded rows point at random blocks, whose contents must not leak in.
    block_tables = torch.randint(0, num_blocks, (len(context_lens), max(blocks_per_seq) + 2), generator=generator, dtype=torch.int32)
    order = torch.arange(num_blocks, dtype=torch.int32) if consecutive else torch.randperm(num_blocks, generator=generator, dtype=torch.int32)
    used = 0
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = order[used : used + count]
        used += count
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator).to(dtype)
    return (
        query, key_cache, value_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32),
        torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32), head_dim**-0.5,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("consecutive", [False, True], ids=["scattered", "consecutive"])
@pytest.mark.parametrize("sliding_window", [0, 10], ids=["full", "window10"])
@pytest.mark.parametrize("padding_budget", [cpu_attention.MAX_PADDED_SCORES, 0], ids=["one-batch", "grouped"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (4, 4)])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_cpu_attention_matches_reference(
    kind: str,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    padding_budget: int,
    sliding_window: int,
    consecutive: bool,
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cpu_attention, "MAX_PADDED_SCORES", padding_budget)
    monkeypatch.setattr(cpu_attention, "_last_plan", cpu_attention._LastPlan())  # planned under this budget
    args = _step_args(*BATCHES[kind], block_size, num_heads, num_kv_heads, dtype, consecutive, seed=block_size + num_heads)
    torch.testing.assert_close(
        cpu_attention.paged_attention(*args, sliding_window=sliding_window), reference.paged_attention(*args, sliding_window=sliding_window), **TOLERANCES[dtype]
    )


@pytest.mark.parametrize("kept_bytes", [cpu_attention.MAX_SCRATCH_BYTES, 0], ids=["kept", "not-kept"])
def test_scratch_buffers_carry_nothing_between_calls(kept_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large step, then a smaller one over other caches (in a buffer the first
    left behind, when kept): each equals the reference."""
    monkeypatch.setattr(cpu_attention, "MAX_SCRATCH_BYTES", kept_bytes)
    monkeypatch.setattr(cpu_attention, "_scratch", cpu_attention._Scratch())
    for seed, (query_lens, context_lens) in enumerate([BATCHES["decodes"], BATCHES["one-decode"]]):
        args = _step_args(query_lens, context_lens, 16, 9, 3, torch.bfloat16, consecutive=False, seed=seed)
        torch.testing.assert_close(cpu_attention.paged_attention(*args), reference.paged_attention(*args), **TOLERANCES[torch.bfloat16])


def test_a_plan_serves_the_layers_of_its_step_and_no_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers of one step (the same metadata, other queries and caches) reuse
    the first layer's plan; metadata changed in place, or equal metadata
    from a new step, never gets a stale plan."""
    monkeypatch.setattr(cpu_attention, "_last_plan", cpu_attention._LastPlan())
    planned = []
    real_plan = cpu_attention._plan
    monkeypatch.setattr(cpu_attention, "_plan", lambda *args: planned.append(1) or real_plan(*args))
    args = list(_step_args(*BATCHES["mixed"], 4, 9, 3, torch.float32, consecutive=False, seed=0))
    with torch.inference_mode():
        for layer in range(3):
            layer_args = _step_args(*BATCHES["mixed"], 4, 9, 3, torch.float32, consecutive=False, seed=layer)
            args[:3] = layer_args[:3]  # another layer: its own query and caches, the step's tables and lengths
            torch.testing.assert_close(cpu_attention.paged_attention(*args), reference.paged_attention(*args), **TOLERANCES[torch.float32])
        assert len(planned) == 1
        args[4][0] -= 1  # in place: the first sequence's context one shorter
        torch.testing.assert_close(cpu_attention.paged_attention(*args), reference.paged_attention(*args), **TOLERANCES[torch.float32])
        assert len(planned) == 2
        args[3] = args[3].clone()  # a new step with equal metadata plans nothing new, and needs nothing new
        torch.testing.assert_close(cpu_attention.paged_attention(*args), reference.paged_attention(*args), **TOLERANCES[torch.float32])
        assert len(planned) == 2
        torch.testing.assert_close(
            cpu_attention.paged_attention(*args, sliding_window=5), reference.paged_attention(*args, sliding_window=5), **TOLERANCES[torch.float32]
        )
        assert len(planned) == 3


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, reference.FP8_CACHE_DTYPE], ids=["float32", "bfloat16", "fp8"])
@pytest.mark.parametrize("slots", [[5, 9, 0, 23], [5, -1, 0, 23]], ids=["all-real", "with-padding"])
def test_cpu_cache_write_equals_reference(cache_dtype: torch.dtype, slots: list[int]) -> None:
    """Rows that are views of a fused projection (as the model passes them),
    written at scattered slots of a 16-bit, 32-bit or FP8 cache."""
    generator = torch.Generator().manual_seed(0)
    fused = torch.randn(len(slots), 2 * 3 * 8, generator=generator).to(torch.float32 if cache_dtype == torch.float32 else torch.bfloat16)
    key, value = (part.view(len(slots), 3, 8) for part in fused.split(3 * 8, dim=-1))
    written = []
    for write in (cpu_attention.reshape_and_cache, reference.reshape_and_cache):
        caches = [torch.full((6, 4, 3, 8), 7.0).to(cache_dtype) for _ in range(2)]
        write(key, value, *caches, torch.tensor(slots), k_scale=0.5, v_scale=2.0)
        written.append([c.view(torch.uint8) if c.dtype == reference.FP8_CACHE_DTYPE else c for c in caches])
    for ours, theirs in zip(*written):
        assert torch.equal(ours, theirs)
