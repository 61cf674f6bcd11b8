"""The per-token FP8 quantization kernel (kernels/fp8_quant.cu) gives the
same bits as its torch reference (kernels/reference.py: quantize_rows) on the
GPU: q and scale, for narrow and wide rows, odd widths, strided rows, zero,
huge, subnormal and non-finite values, bf16 and fp16; inside a CUDA graph;
and the FP8 linear layer on tensor cores quantizes with it."""

from __future__ import annotations

import pytest
import torch

from pagewire.kernels import cuda_fp8_quant, reference
from pagewire.services.engine.executor.layers import fp8

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]


def _fp8_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


needs_fp8 = pytest.mark.skipif(not _fp8_supported(), reason="needs a GPU with FP8 (sm_89+)")


def assert_same_bits(x: torch.Tensor) -> None:
    q, scale = cuda_fp8_quant.quantize_rows(x)
    expected_q, expected_scale = reference.quantize_rows(x)
    assert q.dtype == expected_q.dtype and q.shape == expected_q.shape and scale.shape == expected_scale.shape
    assert torch.equal(scale.view(torch.int32), expected_scale.view(torch.int32))
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))


def random_rows(rows: int, hidden: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal rows, each at its own magnitude from 1e-3 to 1e3, so the scales
    and the rounding of q vary from row to row."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    magnitudes = 10 ** (torch.rand(rows, 1, device="cuda", generator=generator) * 6 - 3)
    return (torch.randn(rows, hidden, device="cuda", generator=generator) * magnitudes).to(dtype)


@needs_fp8
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100, 4096, 14336])
@pytest.mark.parametrize("rows", [1, 3, 257])
def test_quantize_rows_matches_the_reference_bit_for_bit(rows: int, hidden: int, dtype: torch.dtype) -> None:
    assert_same_bits(random_rows(rows, hidden, dtype, seed=rows * hidden))


@needs_fp8
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [8, 1])  # 16-byte accesses, then single elements
@pytest.mark.parametrize("hidden", [1000, 4096])
def test_strided_rows_of_a_wider_tensor(hidden: int, offset: int, dtype: torch.dtype) -> None:
    wide = random_rows(37, hidden + 64, dtype, seed=hidden + offset)
    assert_same_bits(wide[:, offset : offset + hidden])


@needs_fp8
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 4096])
def test_zero_rows_get_the_floor_scale(hidden: int, dtype: torch.dtype) -> None:
    x = random_rows(5, hidden, dtype, seed=1)
    x[1] = 0.0
    x[3] = -0.0  # negative zeros stay negative zeros in E4M3
    assert_same_bits(x)
    _, scale = cuda_fp8_quant.quantize_rows(x)
    assert scale[1].item() == scale[3].item() == torch.tensor(reference.MIN_SCALE, dtype=torch.float32).item()


@needs_fp8
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [100, 4096])
def test_huge_and_subnormal_values(hidden: int, dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    x = random_rows(6, hidden, dtype, seed=2)
    x[0, 7] = info.max  # the largest finite value sets the scale
    x[1] = info.max * torch.sign(x[1].float()).to(dtype)
    x[2] = (x[2].float() * info.smallest_normal).to(dtype)  # subnormal rows: the scale floor
    x[3, :] = info.smallest_normal / 4
    x[4, 0], x[4, 1] = info.max, info.smallest_normal / 8  # a subnormal next to the maximum
    assert_same_bits(x)


@needs_fp8
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_rows_propagate_as_in_the_reference(dtype: torch.dtype) -> None:
    x = random_rows(4, 4096, dtype, seed=3)
    x[1, 5] = float("inf")
    x[2, 9] = float("-inf")
    x[3, 100] = float("nan")
    q, scale = cuda_fp8_quant.quantize_rows(x)
    expected_q, expected_scale = reference.quantize_rows(x)
    # NaN bit patterns may differ in their sign; where they are is what counts.
    torch.testing.assert_close(scale, expected_scale, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(q.float(), expected_q.float(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(q[0].view(torch.uint8), expected_q[0].view(torch.uint8))


@needs_fp8
def test_quantize_rows_inside_a_cuda_graph() -> None:
    """Launched on torch's current stream: captured, it quantizes what the
    static input holds at each replay."""
    x = random_rows(3, 4096, torch.bfloat16, seed=4)
    cuda_fp8_quant.quantize_rows(x)  # compiles and loads outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, scale = cuda_fp8_quant.quantize_rows(x)
    for seed in (5, 6):
        x.copy_(random_rows(3, 4096, torch.bfloat16, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        expected_q, expected_scale = reference.quantize_rows(x)
        assert torch.equal(scale, expected_scale) and torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))


@needs_fp8
def test_scaled_mm_quantizes_the_activations_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(7)
    weight, weight_scale = reference.quantize_rows(torch.randn(256, 512, device="cuda"))
    x = torch.randn(40, 512, device="cuda").to(torch.bfloat16)
    calls = []
    kernel = cuda_fp8_quant.quantize_rows
    monkeypatch.setattr(cuda_fp8_quant, "quantize_rows", lambda rows: calls.append(rows) or kernel(rows))
    out = fp8.fp8_linear_scaled_mm(x, weight, weight_scale, None)
    assert len(calls) == 1
    x_q, x_scale = reference.quantize_rows(x)
    expected = torch._scaled_mm(
        x_q, weight.t(), scale_a=x_scale[:, None], scale_b=weight_scale[None, :], out_dtype=torch.bfloat16, use_fast_accum=True
    )
    assert torch.equal(out, expected)  # the same FP8 operands, so the same GEMM


def test_float32_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="bf16 or fp16"):
        cuda_fp8_quant.quantize_rows(torch.randn(2, 64, device="cuda"))
