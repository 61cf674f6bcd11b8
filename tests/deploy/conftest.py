"""A tiny random-weight model in a HF directory, for the tests that run
deployments as processes: they exercise wiring, routing and draining, and a
model that loads in a moment keeps them short. It carries the embedded
model's tokenizer, so the tokenizer service and the engines agree."""

from __future__ import annotations

from pathlib import Path

import pytest

# Long enough for the drain test's long request.
TINY_MAX_MODEL_LEN = 4096


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer) -> Path:  # type: ignore[no-untyped-def]
    """A directory to mount as /models, holding the model `tiny`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    config = LlamaConfig(
        vocab_size=len(hf_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_MODEL_LEN,
        bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "tiny")
    hf_tokenizer.save_pretrained(root / "tiny")
    return root
