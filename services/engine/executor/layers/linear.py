"""The one place the model's projections are made, so that other kinds of
linear layer (quantized weights, adapters, weights split across devices) have
a single point to plug in where every model picks them up."""

from __future__ import annotations

from torch import nn

from pagewire.services.engine.executor.layers.fp8 import Fp8Linear

# Weight formats of the projections: "none" keeps the compute dtype.
QUANTIZATIONS = ("none", "fp8")


def linear(input_size: int, output_size: int, *, bias: bool = False, quantization: str = "none") -> nn.Module:
    """A projection from input_size to output_size features; its parameters
    are `weight` [output_size, input_size] and, with bias, `bias`, under the
    names checkpoints use; fp8 adds `weight_scale` [output_size]
    (layers/fp8.py)."""
    if quantization == "fp8":
        return Fp8Linear(input_size, output_size, bias=bias)
    if quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r} (known: {', '.join(QUANTIZATIONS)})")
    return nn.Linear(input_size, output_size, bias=bias)
