"""The safetensors path of the loader, on tiny random models that HF
transformers saves: logits and greedy output equal transformers' own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.executor.layers.moe import MoE
from pagewire.services.engine.executor.model_executor import create_engine_core
from pagewire.services.engine.executor.loader import read_hf_config
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
