"""The decode GEMV (kernels/gemv.cu), bf16 and weight-only FP8, against its
torch references, at every token count it takes and the projection shapes of
llama-8b and llama-1b; and the linear layers take it for decode-sized
batches."""

from __future__ import annotations

import pytest
import torch

from pagewire.kernels import cuda_gemv, reference

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn


def _operands(m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, device="cuda", generator=generator).to(torch.bfloat16)
    weight = (torch.randn(n, k, device="cuda", generator=generator) * 100).clamp(-448, 448).to(FP8)
    scale = torch.rand(n, device="cuda", generator=generator) * 1e-3 + 1e-4
    return x, weight, scale


SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (3072, 2048), (1000, 272), (13, 8)]


def _assert_rounded_alike(got: torch.Tensor, expected: torch.Tensor) -> None:
    # Both accumulate in float32 (in another order) and round once to bf16.
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=1e-2 * expected.float().abs().max().item())


@pytest.mark.parametrize("m", range(1, cuda_gemv.MAX_TOKENS["fp8"] + 1))
@pytest.mark.parametrize(("n", "k"), [shape for shape in SHAPES if shape[1] % 16 == 0])
def test_fp8_gemv_matches_the_reference(m: int, n: int, k: int) -> None:
    x, weight, scale = _operands(m, n, k)
    _assert_rounded_alike(cuda_gemv.gemv(x, weight, scale), reference.fp8_weight_gemv(x, weight, scale))


@pytest.mark.parametrize("m", range(1, cuda_gemv.MAX_TOKENS["bf16"] + 1))
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_bf16_gemv_matches_the_reference(m: int, n: int, k: int) -> None:
    generator = torch.Generator(device="cuda").manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, device="cuda", generator=generator).to(torch.bfloat16)
    weight = (torch.randn(n, k, device="cuda", generator=generator) / k**0.5).to(torch.bfloat16)
    _assert_rounded_alike(cuda_gemv.gemv(x, weight), reference.weight_gemv(x, weight))


def test_the_gemv_refuses_what_it_does_not_take() -> None:
    x, weight, scale = _operands(cuda_gemv.MAX_TOKENS["fp8"] + 1, 64, 64)
    with pytest.raises(ValueError, match="the GEMV takes"):
        cuda_gemv.gemv(x, weight, scale)
    with pytest.raises(ValueError, match="float8 weights take their row scales"):
        cuda_gemv.gemv(x[:1], weight)
    with pytest.raises(ValueError, match="bf16 weights none"):
        cuda_gemv.gemv(x[:1], weight.to(torch.bfloat16), scale)


def test_linear_layers_take_the_gemv_for_decode_batches_and_the_gemm_beyond() -> None:
    from pagewire.services.engine.executor.layers.linear import linear

    layer = linear(4096, 1024, bias=True).cuda().to(torch.bfloat16)
    small = torch.randn(cuda_gemv.MAX_TOKENS["bf16"], 4096, device="cuda").to(torch.bfloat16)
    expected = (reference.weight_gemv(small, layer.weight).float() + layer.bias.float()).to(torch.bfloat16)
    torch.testing.assert_close(layer(small).float(), expected.float(), rtol=2e-2, atol=2e-2)
    big = torch.randn(64, 4096, device="cuda").to(torch.bfloat16)
    torch.testing.assert_close(layer(big), torch.nn.functional.linear(big, layer.weight, layer.bias))


def test_fp8_linear_takes_the_gemv_for_decode_batches_and_scaled_mm_beyond() -> None:
    from pagewire.services.engine.executor.layers.fp8 import Fp8Linear, fp8_linear_scaled_mm

    layer = Fp8Linear(4096, 1024).cuda()
    x, weight, scale = _operands(2, 1024, 4096)
    layer.weight.data.copy_(weight)
    layer.weight_scale.data.copy_(scale)
    torch.testing.assert_close(layer(x).float(), reference.fp8_weight_gemv(x, weight, scale).float(), rtol=2e-2, atol=1e-2)
    big = torch.randn(64, 4096, device="cuda").to(torch.bfloat16)
    torch.testing.assert_close(layer(big), fp8_linear_scaled_mm(big, weight, scale, None))


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_in_a_cuda_graph_the_gemv_reads_what_the_norm_before_it_wrote(weights: str) -> None:
    """The GEMV starts while the RMSNorm before it finishes (a programmatic
    dependent launch on sm_90+), reads weights before it waits and the norm's
    output after: captured in a CUDA graph and replayed on new inputs, it
    matches the eager reference each time."""
    from pagewire.kernels import cuda_layer_ops, layer_ops, loader

    if torch.cuda.get_device_capability() >= (9, 0):
        assert loader._launch_kernel_ex(torch.cuda.current_device()) is not None
    _, weight, scale = _operands(1, 6144, 4096)
    if weights == "bf16":
        weight, scale = (weight.float() * scale[:, None]).to(torch.bfloat16), None

    def product(normed: torch.Tensor) -> torch.Tensor:
        return reference.weight_gemv(normed, weight) if scale is None else reference.fp8_weight_gemv(normed, weight, scale)

    norm_weight = (torch.rand(4096, device="cuda") + 0.5).to(torch.bfloat16)
    x = torch.zeros(1, 4096, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cuda_gemv.gemv(cuda_layer_ops.rms_norm(x, norm_weight, 1e-5), weight, scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_gemv.gemv(cuda_layer_ops.rms_norm(x, norm_weight, 1e-5), weight, scale)
    for seed in range(3):
        x.copy_(torch.randn(1, 4096, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)).to(torch.bfloat16))
        graph.replay()
        _assert_rounded_alike(out, product(layer_ops.rms_norm(x, norm_weight, 1e-5)))
