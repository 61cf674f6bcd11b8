"""The one place the model's projections are made, so that other kinds of
linear layer (quantized weights, adapters, weights split across devices) have
a single point to plug in where every model picks them up."""

from __future__ import annotations

from torch import nn


def linear(input_size: int, output_size: int, *, bias: bool = False) -> nn.Linear:
    """A projection from input_size to output_size features; its parameters
    are `weight` [output_size, input_size] and, with bias, `bias`, under the
    names checkpoints use."""
    return nn.Linear(input_size, output_size, bias=bias)
