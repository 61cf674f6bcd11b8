"""FP8 weights between the checkpoint and the model: decides the format of
the decoder's projections (--quantization and the checkpoint's own
quantization_config) and rewrites the checkpoint's tensor stream into what
those layers load.

FP8 layers (layers/fp8.py) take an E4M3 `weight` and a float32 `weight_scale`
with one scale per output row. From a 16/32-bit checkpoint every projection
is quantized at load, row by row (so q/k/v and gate/up, quantized part by
part, are per-channel scaled once stacked). Published FP8 checkpoints load as
they are:
  - HF quant_method "fp8", per-tensor: `weight_scale` (a scalar) becomes the
    scale of every row;
  - HF quant_method "fp8" with weight_block_size [b0, b1]: `weight_scale_inv`
    [ceil(rows/b0), ceil(cols/b1)] multiplies each block; the weight is
    dequantized and requantized per row (one extra rounding of each element),
    since the GEMM takes row scales;
  - compressed-tensors FP8: `weight_scale` per channel [rows, 1] or per tensor.
Static activation scales (`input_scale`) are dropped: the layers scale each
token's activations themselves. KV cache scales (`self_attn.k_scale` /
`v_scale`, or compressed-tensors' `k_proj.output_scale` / `v_proj.output_scale`)
are kept for an FP8 KV cache."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pagewire.services.engine.executor.layers.fp8 import FP8_DTYPE, quantize_rows

QUANTIZATION_CHOICES = ("auto", "fp8", "none")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")
DROPPED_SUFFIXES = (".input_scale",)
KV_SCALE_NAME = re.compile(r"model\.layers\.(\d+)\.self_attn\.(?:(k|v)_scale|(k|v)_proj\.output_scale)")


@dataclass(frozen=True)
class CheckpointQuantization:
    """An FP8 checkpoint's quantization_config: its method and, for
    block-wise scales, the block shape (rows, columns)."""

    method: str
    block_size: tuple[int, int] | None = None


def _compressed_tensors_fp8(raw: dict) -> CheckpointQuantization:
    groups = list((raw.get("config_groups") or {}).values())
    weights = [group.get("weights") or {} for group in groups]
    if not weights or any(w.get("num_bits") != 8 or w.get("type") != "float" for w in weights):
        raise ValueError("only FP8 (8-bit float weights) compressed-tensors checkpoints are supported")
    block = next((w.get("block_structure") for w in weights if w.get("strategy") == "block"), None)
    return CheckpointQuantization("compressed-tensors", tuple(block) if block else None)


def read_checkpoint_quantization(directory: Path) -> CheckpointQuantization | None:
    """The FP8 quantization a HF checkpoint was published with, or None for a
    16/32-bit one; other quantization methods are refused."""
    raw = json.loads((directory / "config.json").read_text()).get("quantization_config")
    if not raw:
        return None
    method = raw.get("quant_method")
    if method == "fp8":
        block = raw.get("weight_block_size")
        return CheckpointQuantization("fp8", tuple(block) if block else None)
    if method == "compressed-tensors":
        return _compressed_tensors_fp8(raw)
    raise ValueError(f"checkpoint quantization {method!r} is not supported (supported: fp8, compressed-tensors FP8)")


def layer_format(quantization: str, checkpoint: CheckpointQuantization | None) -> str:
    """The projections' format: --quantization, where auto keeps the checkpoint's."""
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {quantization!r}")
    if quantization == "auto":
        return "fp8" if checkpoint else "none"
    return quantization


def is_projection_weight(name: str) -> bool:
    """A decoder projection's weight; a mixture of experts' expert weights are not
    (their layer keeps them in the compute dtype, so FP8 ones are dequantized)."""
    return (
        name.startswith("model.layers.") and name.endswith(".weight") and ".experts." not in name and any(f".{p}." in name for p in PROJECTIONS)
    )


def dequantize_checkpoint_weight(weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None) -> torch.Tensor:
    """An FP8 checkpoint weight [rows, cols] in float32, whatever its scale layout."""
    rows, cols = weight.shape
    scale = scale.float().to(weight.device)
    if block_size and scale.dim() == 2 and scale.shape == (math.ceil(rows / block_size[0]), math.ceil(cols / block_size[1])):
        per_element = scale.repeat_interleave(block_size[0], dim=0)[:rows].repeat_interleave(block_size[1], dim=1)[:, :cols]
        return weight.float() * per_element
    if scale.numel() == 1:
        return weight.float() * scale.reshape(())
    if scale.numel() == rows and scale.shape[0] == rows:
        return weight.float() * scale.reshape(rows, 1)
    raise ValueError(f"an FP8 weight of shape {tuple(weight.shape)} has a scale of shape {tuple(scale.shape)} this loader cannot read")


def checkpoint_weight_rows(
    weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 checkpoint weight as (FP8 weight, one float32 scale per row):
    per-tensor and per-channel scales exactly, block-wise ones requantized."""
    rows = weight.shape[0]
    if scale.numel() == 1:
        return weight, scale.float().reshape(1).expand(rows).contiguous()
    if scale.numel() == rows and scale.shape[0] == rows:
        return weight, scale.float().reshape(rows)
    return quantize_rows(dequantize_checkpoint_weight(weight, scale, block_size))


@dataclass
class WeightStream:
    """Rewrites a checkpoint's (name, tensor) stream for projections in
    `layer_format` ("fp8" or "none") on `device`; KV cache scales found on the
    way land in kv_scales[(layer, "k" or "v")]."""

    layer_format: str
    checkpoint: CheckpointQuantization | None
    device: torch.device
    kv_scales: dict[tuple[int, str], float] = field(default_factory=dict)

    def __call__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        block_size = self.checkpoint.block_size if self.checkpoint else None
        # An FP8 weight and its scale may come in either order (or from different files).
        pending_weights: dict[str, torch.Tensor] = {}
        pending_scales: dict[str, torch.Tensor] = {}
        for name, tensor in weights:
            kv_scale = KV_SCALE_NAME.fullmatch(name)
            if kv_scale:
                self.kv_scales[(int(kv_scale.group(1)), kv_scale.group(2) or kv_scale.group(3))] = float(tensor.float().max())
            elif name.endswith(DROPPED_SUFFIXES):
                continue
            elif name.endswith(SCALE_SUFFIXES):
                base = name[: name.rindex(".weight_scale")] + ".weight"
                if base in pending_weights:
                    yield from self._checkpoint_fp8(base, pending_weights.pop(base), tensor, block_size)
                else:
                    pending_scales[base] = tensor
            elif tensor.dtype == FP8_DTYPE:
                if name in pending_scales:
                    yield from self._checkpoint_fp8(name, tensor, pending_scales.pop(name), block_size)
                else:
                    pending_weights[name] = tensor
            elif self.layer_format == "fp8" and is_projection_weight(name):
                weight, scale = quantize_rows(tensor.to(self.device))
                yield name, weight
                yield f"{name}_scale", scale
            else:
                yield name, tensor
        unpaired = sorted(pending_weights) + [f"{name}_scale" for name in sorted(pending_scales)]
        if unpaired:
            raise ValueError(f"FP8 checkpoint tensors without their weight or scale: {', '.join(unpaired[:5])}")

    def _checkpoint_fp8(
        self, name: str, weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        weight = weight.to(self.device)
        if self.layer_format != "fp8" or not is_projection_weight(name):
            yield name, dequantize_checkpoint_weight(weight, scale, block_size)
            return
        weight, scale = checkpoint_weight_rows(weight, scale, block_size)
        yield name, weight
        yield f"{name}_scale", scale
