"""PEFT LoRA adapters for tests: random, non-zero, written with
save_pretrained beside a tiny base model, and prompts HF's generate reads
as written."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from tests.engine import tiny_models

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(base: PreTrainedModel, path: Path, rank: int, alpha: int, targets: list[str], seed: int, rslora: bool = False) -> Path:
    """An adapter of `base` at `path` whose B matrices are random and large
    enough to change greedy continuations (PEFT starts B at zero)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    peft_model.save_pretrained(path)
    return path


def prompt(length: int = tiny_models.PROMPT_LEN, seed: int = 1) -> list[int]:
    """Without token 0, which HF's generate takes for padding (pad_token_id=0) and masks out."""
    return [token or 1 for token in tiny_models.prompt(length, seed)]
