"""The safetensors path of the loader, on tiny random models that HF
transformers saves: logits and greedy output equal transformers' own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import save_file
from transformers import PreTrainedModel

from pagewire.services.common.model import resolve_model
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.executor.layers.fp8 import Fp8Linear
from pagewire.services.engine.executor.layers.moe import MoE
from pagewire.services.engine.executor.model_executor import create_engine_core
from pagewire.services.engine.executor.loader import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, load_model, read_hf_config
from tests.engine import tiny_models
from tests.engine.util import assert_no_leaks, greedy, run_all, tokens_of


def _tiny_engine(path: Path) -> EngineCore:
    return create_engine_core(EngineConfig(model=str(path), device="cpu", num_kv_blocks=32, block_size=4, max_num_batched_tokens=8))


def test_hf_mistral_applies_its_window_to_the_prompt() -> None:
    """The Mistral comparison below means something: transformers' output for
    the prompt changes when the window is taken away."""
    torch.manual_seed(0)
    model = tiny_models.mistral_window().eval()
    windowed = tiny_models.hf_greedy(model, tiny_models.prompt(), 10)
    model.config.sliding_window = None
    assert tiny_models.hf_greedy(model, tiny_models.prompt(), 10) != windowed


@pytest.mark.parametrize(
    "build",
    [tiny_models.llama3_scaled, tiny_models.qwen2_tied, tiny_models.qwen3, tiny_models.mistral_window, tiny_models.mixtral, tiny_models.qwen3_moe],
    ids=["llama-untied-llama3-rope", "qwen2-bias-tied", "qwen3-qk-norm", "mistral-sliding-window", "mixtral-top2", "qwen3-moe-top3-dense-layer"],
)
def test_safetensors_model_matches_transformers(tmp_path, build) -> None:
    torch.manual_seed(0)
    reference = build().eval()
    reference.save_pretrained(tmp_path)
    config = read_hf_config(tmp_path)
    assert config.qkv_bias == (config.architecture == "qwen2")
    assert config.qk_norm == (config.architecture in ("qwen3", "qwen3_moe"))
    assert config.num_experts == (getattr(reference.config, "num_local_experts", None) or getattr(reference.config, "num_experts", 0))
    assert config.sliding_window == (getattr(reference.config, "sliding_window", None) or 0)
    assert (config.rope_scaling or {}).get("rope_type") == ("llama3" if config.architecture == "llama" else None)
    core = _tiny_engine(tmp_path)
    # Long enough to pass the llama3 rope's original context and Mistral's window, in several chunks.
    prompt = tiny_models.prompt()
    core.add_request("r", prompt, greedy(10, ignore_eos=True))
    outputs = run_all(core)["r"]
    with torch.inference_mode():
        hf_logits = reference(torch.tensor([prompt])).logits[0, -1]
    assert tokens_of(outputs) == tiny_models.hf_greedy(reference, prompt, 10)
    core.add_request("lp", prompt, greedy(1, logprobs=3))
    (out,) = run_all(core)["lp"]
    assert out.logprobs[0].logprob == pytest.approx(torch.log_softmax(hf_logits, -1)[out.new_token_ids[0]].item(), abs=1e-5)
    assert_no_leaks(core)


def test_fused_expert_tensors_load_like_per_expert_ones(tmp_path: Path) -> None:
    """Published checkpoints and save_pretrained name each expert's tensors;
    a checkpoint of transformers' in-memory 3D expert tensors loads too."""
    torch.manual_seed(0)
    reference = tiny_models.qwen3_moe().eval()
    reference.save_pretrained(tmp_path)
    state = reference.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, tmp_path / "model.safetensors")
    core = _tiny_engine(tmp_path)
    layers = core.executor.loaded.model.model.layers
    assert isinstance(layers[0].mlp, MoE) and not isinstance(layers[1].mlp, MoE)
    prompt = tiny_models.prompt()
    core.add_request("r", prompt, greedy(10, ignore_eos=True))
    assert tokens_of(run_all(core)["r"]) == tiny_models.hf_greedy(reference, prompt, 10)


def _write_gguf(model: PreTrainedModel, path: Path) -> None:
    """The model as llama.cpp's converter writes a Qwen-family GGUF (F32, no
    rotary permutation), without the tokenizer, which the engine does not read."""
    c = model.config
    # llama.cpp spells Qwen3-MoE without the underscore.
    writer = GGUFWriter(str(path), {"qwen3_moe": "qwen3moe"}.get(c.model_type, c.model_type))
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if getattr(c, "num_experts", 0):
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_weights_norm(c.norm_topk_prob)
    gguf_names = {hf: gguf for gguf, hf in GGUF_GLOBAL_NAMES.items()}
    layer_names = {hf: gguf for gguf, hf in GGUF_LAYER_NAMES.items()}
    for name, tensor in model.state_dict().items():
        experts = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if experts:  # transformers' 3D experts, as llama.cpp's ffn_{gate,up,down}_exps
            parts = dict(zip(("ffn_gate_exps", "ffn_up_exps"), tensor.chunk(2, dim=1))) if experts[2] == "gate_up_proj" else {"ffn_down_exps": tensor}
            for gguf_part, weights in parts.items():
                writer.add_tensor(f"blk.{experts[1]}.{gguf_part}.weight", weights.float().contiguous().numpy())
            continue
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        gguf_name = f"blk.{layer[1]}.{layer_names[layer[2]]}.{layer[3]}" if layer else gguf_names[name]
        writer.add_tensor(gguf_name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Each family as llama.cpp writes it, and what the engine must read from the file:
# Qwen3's head size apart from hidden / heads; Qwen3-MoE's experts (one 3D tensor
# per part and layer), top-3 of 6 not renormalised, and a dense layer without a router.
GGUF_FAMILIES = {
    "qwen3": (tiny_models.qwen3, {"qk_norm": True, "head_dim": 32}),
    "qwen3-moe": (tiny_models.qwen3_moe, {"architecture": "qwen3_moe", "num_experts": 6, "num_experts_per_tok": 3, "norm_topk_prob": False, "dense_layers": (1,)}),
}


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_from_gguf_matches_transformers(tmp_path: Path, family: str) -> None:
    build, expected = GGUF_FAMILIES[family]
    torch.manual_seed(0)
    reference = build().eval()
    _write_gguf(reference, tmp_path / f"{family}.gguf")
    core = _tiny_engine(tmp_path / f"{family}.gguf")
    config = core.executor.loaded.config
    assert {name: getattr(config, name) for name in expected} == expected
    prompt = tiny_models.prompt()
    core.add_request("r", prompt, greedy(10, ignore_eos=True))
    assert tokens_of(run_all(core)["r"]) == tiny_models.hf_greedy(reference, prompt, 10)


def test_fp8_weights_leave_the_experts_in_the_compute_dtype(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny_models.mixtral().save_pretrained(tmp_path)
    loaded = load_model(resolve_model(str(tmp_path)), torch.device("cpu"), torch.float32, quantization="fp8")
    layer = loaded.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Fp8Linear)
    assert layer.mlp.experts.gate_up_proj.dtype == layer.mlp.gate.weight.dtype == torch.float32
