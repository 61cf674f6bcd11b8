"""Reading a PEFT LoRA adapter (adapter_config.json and
adapter_model.safetensors, as PeftModel.save_pretrained writes them) into
host tensors keyed by the engine's fused projections. Anything the batched
LoRA layers cannot apply exactly is refused with the reason: DoRA, biases,
modules_to_save, per-module ranks or alphas, targets outside the attention
and MLP projections, ranks above --max-lora-rank."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pagewire.services.common.errors import RequestError, invalid_argument
from pagewire.services.engine.executor.models.llama import Piece

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# base_model.model.<module>.lora_A.weight (or lora_B), as PEFT names the tensors of a causal LM.
TENSOR_NAME = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight")
# Settings whose non-default value changes what the adapter computes, and why pagewire refuses it.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) is not supported",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) are not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights) is not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters is not supported",
}


@dataclass(frozen=True)
class LoraPart:
    """One adapted checkpoint projection: its part of an engine projection,
    A [rank, in] and B [rows, rank] with the adapter's scale folded in."""

    part: int
    a: torch.Tensor
    b: torch.Tensor


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    path: str
    rank: int
    # Engine module path (e.g. model.layers.0.self_attn.qkv_proj) -> its adapted parts.
    parts: dict[str, list[LoraPart]]


def _refuse(name: str, path: str, why: str) -> RequestError:
    return invalid_argument(f"LoRA adapter {name!r} at {path}: {why}", "lora_path")


def _read_config(name: str, path: str, directory: Path, max_rank: int) -> tuple[int, float]:
    """(rank, scale) of a supported adapter config; RequestError naming the first problem otherwise."""
    if not (directory / CONFIG_FILE).is_file():
        raise _refuse(name, path, f"no {CONFIG_FILE} there (a directory written by PeftModel.save_pretrained is expected)")
    if not (directory / WEIGHTS_FILE).is_file():
        raise _refuse(name, path, f"no {WEIGHTS_FILE} there (save the adapter with safe_serialization=True)")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise _refuse(name, path, f"{CONFIG_FILE} does not parse: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise _refuse(name, path, f"peft_type is {config.get('peft_type')!r}; only LORA adapters are served")
    if config.get("bias", "none") != "none":
        raise _refuse(name, path, f"bias={config['bias']!r} is not supported (only 'none')")
    for key, why in UNSUPPORTED.items():
        if config.get(key):
            raise _refuse(name, path, why)
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not set(targets) <= set(TARGET_MODULES):
        raise _refuse(name, path, f"target_modules {targets!r}: pagewire applies adapters to {', '.join(TARGET_MODULES)} only")
    rank = config.get("r")
    if not isinstance(rank, int) or not 0 < rank <= max_rank:
        raise _refuse(name, path, f"rank r={rank!r} must be in [1, {max_rank}] (--max-lora-rank)")
    alpha = config.get("lora_alpha", rank)
    return rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def read_adapter(name: str, path: str, max_rank: int, dtype: torch.dtype) -> LoraAdapter:
    directory = Path(path)
    rank, scale = _read_config(name, path, directory, max_rank)
    try:
        tensors = load_file(directory / WEIGHTS_FILE)
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise _refuse(name, path, f"{WEIGHTS_FILE} does not load: {exc}") from None
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = TENSOR_NAME.fullmatch(key)
        if match is None or match.group(1).rsplit(".", 1)[-1] not in TARGET_MODULES:
            raise _refuse(name, path, f"tensor {key!r} is not the lora_A/lora_B weight of a supported projection")
        halves.setdefault(match.group(1), {})[match.group(2)] = tensor
    parts: dict[str, list[LoraPart]] = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise _refuse(name, path, f"{module} has lora_{''.join(pair)} without its other half")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise _refuse(name, path, f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not have rank {rank}")
        piece = Piece.of(f"{module}.weight")
        target = piece.param.removesuffix(".weight")
        parts.setdefault(target, []).append(LoraPart(piece.part or 0, a.to(dtype), (b.float() * scale).to(dtype)))
    if not parts:
        raise _refuse(name, path, f"{WEIGHTS_FILE} holds no LoRA weights")
    return LoraAdapter(name, path, rank, parts)
