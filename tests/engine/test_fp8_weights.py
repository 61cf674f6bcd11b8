"""--quantization fp8 on the CPU: row-wise quantization, the dequantized FP8
product, and a 16/32-bit checkpoint quantized at load (fused q/k/v and
gate/up get per-channel scales; embeddings, norms and lm_head stay)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from pagewire.services.common.model import resolve_model
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.executor.layers.fp8 import FP8_DTYPE, FP8_MAX, Fp8Linear, dequantize_rows, fp8_linear_reference, quantize_rows
from pagewire.services.engine.executor.loader import load_model
from pagewire.services.engine.executor.model_executor import create_engine_core
from tests.engine.util import assert_no_leaks, greedy, run_all, tokens_of

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, eos_token_id=None, tie_word_embeddings=False,
)  # fmt: skip


def tiny_llama(directory) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model.save_pretrained(directory)
    return model


def test_quantize_rows_scales_each_row_to_the_e4m3_range() -> None:
    x = torch.randn(8, 64) * torch.logspace(-3, 3, 8)[:, None]
    x[3] = 0
    q, scale = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (8,) and scale.dtype == torch.float32
    assert torch.equal(q.float().abs().amax(-1)[[0, 1, 2, 4, 5, 6, 7]], torch.full((7,), FP8_MAX))
    back = dequantize_rows(q, scale, torch.float32)
    assert torch.isfinite(back).all() and back[3].abs().max() == 0
    # E4M3 keeps 3 mantissa bits: each element within half a step (2^-4 relative) of the input.
    assert ((back - x).abs() <= x.abs() * 2**-4 + scale[:, None] * 2**-9).all()


def test_fp8_linear_is_the_dequantized_product_of_fp8_operands() -> None:
    torch.manual_seed(0)
    weight, x, bias = torch.randn(48, 32), torch.randn(5, 7, 32), torch.randn(48)
    layer = Fp8Linear(32, 48, bias=True)
    q, scale = quantize_rows(weight)
    layer.weight.data, layer.weight_scale.data, layer.bias.data = q, scale, bias
    out = layer(x)
    assert out.shape == (5, 7, 48)
    torch.testing.assert_close(out, fp8_linear_reference(x.reshape(-1, 32), q, scale, bias).reshape(5, 7, 48))
    exact = F.linear(x, weight, bias)
    assert (out - exact).norm() / exact.norm() < 0.05


def test_checkpoint_is_quantized_at_load_with_per_channel_scales(tmp_path) -> None:
    reference = tiny_llama(tmp_path)
    loaded = load_model(resolve_model(str(tmp_path)), torch.device("cpu"), torch.float32, quantization="fp8")
    assert loaded.config.quantization == "fp8"
    params = dict(loaded.model.named_parameters())
    hf = dict(reference.named_parameters())
    for fused, parts in {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"), "self_attn.o_proj": ("self_attn.o_proj",)}.items():  # fmt: skip
        weight, scale = params[f"model.layers.1.{fused}.weight"], params[f"model.layers.1.{fused}.weight_scale"]
        assert weight.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == weight.shape[:1]
        original = torch.cat([hf[f"model.layers.1.{part}.weight"] for part in parts])
        expected_q, expected_scale = quantize_rows(original)
        torch.testing.assert_close(scale, expected_scale)
        assert torch.equal(weight.view(torch.uint8), expected_q.view(torch.uint8))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
        assert params[name].dtype == torch.float32
        torch.testing.assert_close(params[name], hf[name], rtol=0, atol=0)


def test_engine_serves_fp8_weights_and_reports_them(tmp_path) -> None:
    tiny_llama(tmp_path)
    config = EngineConfig(model=str(tmp_path), device="cpu", num_kv_blocks=32, block_size=4, max_num_batched_tokens=16)
    prompt = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    outputs = {}
    for quantization in ("none", "fp8"):
        core = create_engine_core(EngineConfig(**{**vars(config), "quantization": quantization}))
        assert core.info.quantization == quantization
        core.add_request("r", prompt, greedy(8, ignore_eos=True))
        outputs[quantization] = tokens_of(run_all(core)["r"])
        assert_no_leaks(core)
    assert len(outputs["fp8"]) == 8
