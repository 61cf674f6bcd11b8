"""The CPU's projections through oneDNN over prepacked weights
(layers/linear.py): the same product as F.linear, and what the CPU runner
packs, including a tied LM head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagewire.services.common.model import resolve_model
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.executor.layers import linear as linear_layers
from pagewire.services.engine.executor.layers.fp8 import Fp8Linear
from pagewire.services.engine.executor.layers.linear import PrepackedLinear, can_prepack, prepack_projections
from pagewire.services.engine.executor.loader import load_model
from pagewire.services.engine.executor.model_executor import create_engine_core
from tests.engine import tiny_models

pytestmark = pytest.mark.skipif(not can_prepack(torch.zeros(1, 1)), reason="this torch's oneDNN does not reorder float32 weights here")

# oneDNN sums in another order than MKL: float32 agrees to rounding, bfloat16 to its 8-bit mantissa.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_product_equals_f_linear(dtype, bias) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 80, generator=generator).to(dtype)
    bias_values = torch.randn(96, generator=generator).to(dtype) if bias else None
    layer = PrepackedLinear(weight, bias_values)
    assert layer.weight.shape == weight.shape and layer.weight.dtype == dtype and layer.weight.is_meta
    # Row counts around the packing hint, none, and a strided view as the projections' inputs can be.
    inputs = [torch.randn(rows, 80, generator=generator).to(dtype) for rows in (0, 1, 2, 31, 32, 33, 300)]
    inputs.append(torch.randn(5, 160, generator=generator).to(dtype)[:, ::2])
    with torch.inference_mode():
        for x in inputs:
            torch.testing.assert_close(layer(x), F.linear(x, weight, bias_values), **TOLERANCE[dtype])
    state = layer.state_dict()  # the values unpacked, exactly
    assert torch.equal(state["weight"], weight) and (not bias or torch.equal(state["bias"], bias_values))


def test_prepacked_linear_refuses_what_onednn_does_not_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not can_prepack(torch.zeros(4, 4, dtype=torch.float16))
    assert not can_prepack(torch.zeros(4, 4, device="meta"))
    with pytest.raises(ValueError, match="CPU weight"):
        PrepackedLinear(torch.zeros(4, 4, dtype=torch.float16))
    # A torch whose oneDNN cannot reorder here: torch's own GEMM stays.
    monkeypatch.setattr(linear_layers, "_onednn_computes", lambda dtype: False)
    model = nn.Sequential(nn.Linear(8, 8))
    assert prepack_projections(model) == 0 and type(model[0]) is nn.Linear


def test_prepack_projections_replaces_dense_cpu_projections_once() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(nn.Linear(16, 8, bias=False)), Fp8Linear(8, 8), nn.Linear(8, 8).half())
    assert prepack_projections(model) == 2
    assert isinstance(model[0], PrepackedLinear) and isinstance(model[1][0], PrepackedLinear)
    assert isinstance(model[2], Fp8Linear) and type(model[3]) is nn.Linear  # fp8 and float16 keep their own products
    assert prepack_projections(model) == 0


@pytest.mark.parametrize("build", [tiny_models.qwen2_tied, tiny_models.llama3_scaled], ids=["tied-head", "own-head"])
def test_cpu_runner_packs_every_projection_and_keeps_the_logits(build, tmp_path) -> None:
    torch.manual_seed(0)
    build().save_pretrained(tmp_path)
    loaded = load_model(resolve_model(str(tmp_path)), torch.device("cpu"), torch.float32)
    hidden = torch.randn(7, loaded.config.hidden_size)
    with torch.inference_mode():
        dense_logits = loaded.model.compute_logits(hidden)
        create_engine_core(EngineConfig(model=str(tmp_path), device="cpu", num_kv_blocks=16, block_size=4), loaded)
        packed_logits = loaded.model.compute_logits(hidden)
    projections = [m for m in loaded.model.modules() if isinstance(m, (nn.Linear, PrepackedLinear))]
    assert projections and all(isinstance(m, PrepackedLinear) for m in projections)
    assert isinstance(loaded.model.lm_head, PrepackedLinear)
    assert not loaded.model.model.embed_tokens.weight.is_meta  # a tied head packs a copy; the embedding keeps its values
    torch.testing.assert_close(packed_logits, dense_logits, **TOLERANCE[torch.float32])
