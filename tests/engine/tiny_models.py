"""Tiny random models of each supported architecture, built with HF
transformers (to be written with save_pretrained and compared against), a
prompt and HF's greedy continuation of it."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedModel, Qwen2Config,
    Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
)  # fmt: skip

VOCAB = 256
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, eos_token_id=None,
)  # fmt: skip
PROMPT_LEN = 40
WINDOW = 14  # shorter than the prompt, and not a multiple of the tests' block size (4)


def llama3_scaled() -> LlamaForCausalLM:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False, rope_parameters=rope))


def qwen2_tied() -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))


def qwen3() -> Qwen3ForCausalLM:
    # head_dim apart from hidden / heads, as in the released Qwen3 models.
    return Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False))


def mistral_window() -> MistralForCausalLM:
    return MistralForCausalLM(MistralConfig(**TINY, sliding_window=WINDOW, tie_word_embeddings=False))


def mixtral() -> MixtralForCausalLM:
    # Top-2 of 4 experts, renormalised.
    return MixtralForCausalLM(MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False))


def qwen3_moe() -> Qwen3MoeForCausalLM:
    # Top-3 of 6 experts, not renormalised; layer 1 keeps a dense MLP.
    config = Qwen3MoeConfig(
        **TINY, head_dim=32, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[1],
        tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(config)


def prompt(length: int = PROMPT_LEN, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        generated = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return generated[0, len(prompt_ids) :].tolist()
