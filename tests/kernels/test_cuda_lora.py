"""The batched LoRA kernels (kernels/lora.cu) against their torch reference
(kernels/reference.py: lora_shrink, lora_expand, add_lora) on llama-1b's
projections, with tokens of several slots and of none (-1), adapters of
ranks below the slots' (zero-padded), bf16 and fp16, a decode step's token
and a prefill chunk's; and captured in a CUDA graph, where each replay reads
the slots' current values."""

from __future__ import annotations

import pytest
import torch

from pagewire.kernels import cuda_lora, reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
NUM_SLOTS = 4
# llama-1b (hidden 2048, 32 query heads and 8 key/value heads of 64, intermediate 8192): (input, output parts).
PROJECTIONS = {
    "qkv": (2048, [2048, 512, 512]),
    "o": (2048, [2048]),
    "gate_up": (2048, [8192, 8192]),
    "down": (8192, [2048]),
}


def _slots_weights(input_size: int, part_sizes: list[int], max_rank: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_a [in, parts, slots, max_rank] and lora_b [slots, max_rank, out]
    as LoraLinear holds them: slot s has an adapter of rank max_rank >> s
    (zeros beyond it), the last slot none at all; each shrunk and expanded
    value is of the order of 1."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    parts = len(part_sizes)
    lora_a = torch.zeros(input_size, parts, NUM_SLOTS, max_rank, device="cuda")
    lora_b = torch.zeros(NUM_SLOTS, max_rank, sum(part_sizes), device="cuda")
    for slot in range(NUM_SLOTS - 1):
        rank = max(1, max_rank >> slot)
        lora_a[:, :, slot, :rank] = torch.randn(input_size, parts, rank, device="cuda", generator=generator) * input_size**-0.5
        lora_b[slot, :rank] = torch.randn(rank, sum(part_sizes), device="cuda", generator=generator) * rank**-0.5
    return lora_a.to(dtype), lora_b.to(dtype)


def _token_slots(num_tokens: int, seed: int) -> torch.Tensor:
    """Runs of one slot (as a prefill chunk's tokens), then every slot and -1 mixed (as a decode batch's)."""
    generator = torch.Generator().manual_seed(seed)
    runs = torch.arange(num_tokens) // 40 % (NUM_SLOTS + 1) - 1
    mixed = torch.randint(-1, NUM_SLOTS, (num_tokens,), generator=generator)
    return torch.where(torch.arange(num_tokens) < num_tokens // 2, runs, mixed).cuda()


def _expected(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, part_sizes: list[int]) -> torch.Tensor:
    """The reference in float64 on the CPU: the kernels add up in float32 and round once."""
    cpu = [t.cpu().double() for t in (out, x, lora_a, lora_b)]
    return reference.add_lora(*cpu, token_slots.cpu(), part_sizes)


def _assert_close_to(actual: torch.Tensor, expected: torch.Tensor, roundings: int = 1) -> None:
    step = roundings * {torch.bfloat16: 2**-7, torch.float16: 2**-10}[actual.dtype]
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=step, atol=step)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 300])
@pytest.mark.parametrize("max_rank", [16, 64])
@pytest.mark.parametrize("projection", sorted(PROJECTIONS))
def test_add_lora_matches_reference(dtype: torch.dtype, num_tokens: int, max_rank: int, projection: str) -> None:
    input_size, part_sizes = PROJECTIONS[projection]
    seed = num_tokens + max_rank + input_size
    lora_a, lora_b = _slots_weights(input_size, part_sizes, max_rank, dtype, seed)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, input_size, device="cuda", generator=generator).to(dtype)
    out = torch.randn(num_tokens, sum(part_sizes), device="cuda", generator=generator).to(dtype)
    token_slots = _token_slots(num_tokens, seed) if num_tokens > 1 else torch.tensor([1], device="cuda")
    base = out.clone()

    partial = cuda_lora.lora_shrink(x, lora_a, token_slots)
    expected_shrunk = reference.lora_shrink(x.cpu().double(), lora_a.cpu().double(), token_slots.cpu())
    torch.testing.assert_close(partial.sum(0).cpu().double(), expected_shrunk, rtol=1e-3, atol=1e-3)

    expected = _expected(base, x, lora_a, lora_b, token_slots, part_sizes)
    result = cuda_lora.add_lora(out, x, lora_a, lora_b, token_slots, part_sizes)
    assert result.data_ptr() == out.data_ptr()  # in place
    _assert_close_to(result, expected)
    without_adapter = token_slots < 0
    assert torch.equal(result[without_adapter], base[without_adapter])


@pytest.mark.parametrize("dtype", DTYPES)
def test_expand_writes_only_its_columns_of_a_wider_row(dtype: torch.dtype) -> None:
    """Rows of a wider tensor (a strided output) and x: the padding columns stay as they were."""
    input_size, part_sizes = PROJECTIONS["qkv"]
    lora_a, lora_b = _slots_weights(input_size, part_sizes, 16, dtype, seed=5)
    wide_x = torch.randn(37, input_size + 64, device="cuda").to(dtype)
    wide_out = torch.randn(37, sum(part_sizes) + 64, device="cuda").to(dtype)
    x, out = wide_x[:, 32 : 32 + input_size], wide_out[:, :-64]
    token_slots = _token_slots(37, seed=5)
    before = wide_out.clone()
    expected = _expected(out, x, lora_a, lora_b, token_slots, part_sizes)
    cuda_lora.add_lora(out, x, lora_a, lora_b, token_slots, part_sizes)
    _assert_close_to(out, expected)
    assert torch.equal(wide_out[:, -64:], before[:, -64:])


def test_captured_in_a_cuda_graph_reads_the_slots_at_replay() -> None:
    input_size, part_sizes = PROJECTIONS["gate_up"]
    lora_a, lora_b = _slots_weights(input_size, part_sizes, 16, torch.bfloat16, seed=7)
    x = torch.randn(8, input_size, device="cuda").to(torch.bfloat16)
    base = torch.randn(8, sum(part_sizes), device="cuda").to(torch.bfloat16)
    out = base.clone()
    token_slots = torch.full((8,), -1, dtype=torch.int64, device="cuda")
    cuda_lora.add_lora(out.clone(), x, lora_a, lora_b, token_slots, part_sizes)  # loads the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_lora.add_lora(out, x, lora_a, lora_b, token_slots, part_sizes)
    for slots in ([-1] * 8, [0, 1, 2, 3, -1, 0, 0, 2], [3, 2, 1, 0, 0, 1, 2, 3]):
        token_slots.copy_(torch.tensor(slots))
        x.copy_(torch.randn_like(x, dtype=torch.float32))
        out.copy_(base)
        graph.replay()
        torch.cuda.synchronize()
        _assert_close_to(out, _expected(base, x, lora_a, lora_b, token_slots, part_sizes))


@pytest.mark.parametrize("kernel", ["dense", "gathered"])
def test_lora_linear_on_the_gpu_takes_the_kernel_asked_for(kernel: str) -> None:
    from pagewire.services.engine.executor.layers.lora import DENSE_MAX_SLOT_COLUMNS, LoraContext, LoraLinear

    device = torch.device("cuda")
    input_size, part_sizes = PROJECTIONS["qkv"]
    context = LoraContext(NUM_SLOTS, 16, device, kernel)
    assert context.add_lora is {"dense": reference.add_lora, "gathered": cuda_lora.add_lora}[kernel]
    assert LoraContext(NUM_SLOTS, DENSE_MAX_SLOT_COLUMNS // NUM_SLOTS, device).kernel == "dense"
    assert LoraContext(NUM_SLOTS, 2 * DENSE_MAX_SLOT_COLUMNS // NUM_SLOTS, device).kernel == "gathered"
    base = torch.nn.Linear(input_size, sum(part_sizes), bias=False, device=device, dtype=torch.bfloat16)
    layer = LoraLinear(base, input_size, part_sizes, 16, context, torch.bfloat16, device)
    layer.lora_a.copy_(_slots_weights(input_size, part_sizes, 16, torch.bfloat16, seed=9)[0])
    layer.lora_b.copy_(_slots_weights(input_size, part_sizes, 16, torch.bfloat16, seed=9)[1])
    x = torch.randn(20, input_size, device=device).to(torch.bfloat16)
    token_slots = _token_slots(20, seed=9)
    context.bind(token_slots)
    with torch.inference_mode():
        # Dense rounds the rank-wide product x @ A to the dtype before B takes it (as PEFT does).
        _assert_close_to(layer(x), _expected(base(x), x, layer.lora_a, layer.lora_b, token_slots, part_sizes), roundings=2 if kernel == "dense" else 1)
