"""The safetensors path of the loader, on tiny random models that HF
transformers saves: logits and greedy output equal transformers' own."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
    Qwen3ForCausalLM,
)  # fmt: skip

from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.executor.model_executor import create_engine_core
from pagewire.services.engine.executor.loader import read_hf_config
from tests.engine.util import assert_no_leaks, greedy, run_all, tokens_of

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, eos_token_id=None,
)  # fmt: skip
PROMPT_LEN = 40
WINDOW = 14  # shorter than the prompt, and not a multiple of the block size below


def _llama3_scaled() -> LlamaForCausalLM:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False, rope_parameters=rope))


def _qwen2_tied() -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))


def _qwen3() -> Qwen3ForCausalLM:
    # head_dim apart from hidden / heads, as in the released Qwen3 models.
    return Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False))


def _mistral_window() -> MistralForCausalLM:
    return MistralForCausalLM(MistralConfig(**TINY, sliding_window=WINDOW, tie_word_embeddings=False))


def _prompt() -> list[int]:
    return torch.randint(0, 256, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()


def _hf_greedy(model: PreTrainedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return generated[0, len(prompt) :].tolist()


def test_hf_mistral_applies_its_window_to_the_prompt() -> None:
    """The Mistral comparison below means something: transformers' output for
    the prompt changes when the window is taken away."""
    torch.manual_seed(0)
    model = _mistral_window().eval()
    windowed = _hf_greedy(model, _prompt(), 10)
    model.config.sliding_window = None
    assert _hf_greedy(model, _prompt(), 10) != windowed


@pytest.mark.parametrize(
    "build",
    [_llama3_scaled, _qwen2_tied, _qwen3, _mistral_window],
    ids=["llama-untied-llama3-rope", "qwen2-bias-tied", "qwen3-qk-norm", "mistral-sliding-window"],
)
def test_safetensors_model_matches_transformers(tmp_path, build) -> None:
    torch.manual_seed(0)
    reference = build().eval()
    reference.save_pretrained(tmp_path)
    config = read_hf_config(tmp_path)
    assert config.qkv_bias == (config.architecture == "qwen2")
    assert config.qk_norm == (config.architecture == "qwen3")
    assert config.sliding_window == (getattr(reference.config, "sliding_window", None) or 0)
    assert (config.rope_scaling or {}).get("rope_type") == ("llama3" if config.architecture == "llama" else None)
    core = create_engine_core(EngineConfig(model=str(tmp_path), device="cpu", num_kv_blocks=32, block_size=4, max_num_batched_tokens=8))
    # Long enough to pass the llama3 rope's original context and Mistral's window, in several chunks.
    prompt = _prompt()
    core.add_request("r", prompt, greedy(10, ignore_eos=True))
    outputs = run_all(core)["r"]
    with torch.inference_mode():
        hf_logits = reference(torch.tensor([prompt])).logits[0, -1]
    assert tokens_of(outputs) == _hf_greedy(reference, prompt, 10)
    core.add_request("lp", prompt, greedy(1, logprobs=3))
    (out,) = run_all(core)["lp"]
    assert out.logprobs[0].logprob == pytest.approx(torch.log_softmax(hf_logits, -1)[out.new_token_ids[0]].item(), abs=1e-5)
    assert_no_leaks(core)
