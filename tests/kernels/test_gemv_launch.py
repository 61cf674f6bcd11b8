"""The host side of the decode GEMV (kernels/cuda_gemv.py), which runs on the
CPU: its constants agree with the source, it refuses what the kernel does not
take with a message that says why, and the projections it serves on the GPU
fall back to torch's product everywhere else."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from pagewire.kernels import cuda_gemv
from pagewire.kernels.loader import KERNEL_DIR
from pagewire.services.engine.executor.layers.linear import Linear, linear, project


def test_the_launcher_agrees_with_the_source() -> None:
    source = (KERNEL_DIR / cuda_gemv.SOURCE).read_text()
    assert int(re.search(r"constexpr int GEMV_WARPS = (\d+);", source).group(1)) == cuda_gemv.ROWS_PER_BLOCK
    for weights, rows in cuda_gemv.ROWS.items():
        per_load = re.search(rf"struct {rows} \{{\s*static constexpr int PER_LOAD = (\d+);", source)
        assert per_load is not None and int(per_load.group(1)) == cuda_gemv.WEIGHTS_PER_LOAD[weights]


@pytest.mark.parametrize(
    ("x", "weight"),
    [
        (torch.zeros(1, 16, dtype=torch.bfloat16), torch.zeros(4, 16, dtype=torch.bfloat16)),  # on the CPU
        (torch.zeros(1, 16), torch.zeros(4, 16)),  # float32
        (torch.zeros(1, 16, dtype=torch.float16), torch.zeros(4, 16, dtype=torch.float16)),
    ],
)
def test_the_gemv_refuses_what_it_does_not_take(x: torch.Tensor, weight: torch.Tensor) -> None:
    assert not cuda_gemv.supports(x, weight)
    with pytest.raises(ValueError, match=r"the GEMV takes bf16 x on the GPU with at most \d+ \(bf16 weights\) or \d+ \(fp8 weights\) rows"):
        cuda_gemv.gemv(x, weight)


def test_projections_off_the_gpu_are_torchs_product() -> None:
    torch.manual_seed(0)
    layer = linear(16, 8, bias=True)
    assert isinstance(layer, Linear)
    for rows in (1, 2, 5):
        x = torch.randn(3, rows, 16)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert torch.equal(project(x, layer.weight), F.linear(x, layer.weight))
