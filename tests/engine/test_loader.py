"""The safetensors path of the loader, on tiny random models that HF
transformers saves: logits and greedy output equal transformers' own."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.executor.model_executor import create_engine_core
from pagewire.services.engine.executor.loader import read_hf_config
from tests.engine.util import assert_no_leaks, greedy, run_all, tokens_of

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, eos_token_id=None,
)  # fmt: skip


def _llama3_scaled() -> LlamaForCausalLM:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False, rope_parameters=rope))


def _qwen2_tied() -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))


def _qwen3() -> Qwen3ForCausalLM:
    # head_dim apart from hidden / heads, as in the released Qwen3 models.
    return Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False))


@pytest.mark.parametrize(
    "build", [_llama3_scaled, _qwen2_tied, _qwen3], ids=["llama-untied-llama3-rope", "qwen2-bias-tied", "qwen3-qk-norm"]
)
def test_safetensors_model_matches_transformers(tmp_path, build) -> None:
    torch.manual_seed(0)
    reference = build().eval()
    reference.save_pretrained(tmp_path)
    config = read_hf_config(tmp_path)
    assert config.qkv_bias == (config.architecture == "qwen2")
    assert config.qk_norm == (config.architecture == "qwen3")
    assert (config.rope_scaling or {}).get("rope_type") == ("llama3" if config.architecture == "llama" else None)
    core = create_engine_core(EngineConfig(model=str(tmp_path), device="cpu", num_kv_blocks=32, block_size=4, max_num_batched_tokens=8))
    # Long enough to pass the llama3 rope's original context, in several chunks.
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    core.add_request("r", prompt, greedy(10, ignore_eos=True))
    outputs = run_all(core)["r"]
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(prompt) :].tolist()
        hf_logits = reference(torch.tensor([prompt])).logits[0, -1]
    assert tokens_of(outputs) == expected
    core.add_request("lp", prompt, greedy(1, logprobs=3))
    (out,) = run_all(core)["lp"]
    assert out.logprobs[0].logprob == pytest.approx(torch.log_softmax(hf_logits, -1)[out.new_token_ids[0]].item(), abs=1e-5)
    assert_no_leaks(core)
