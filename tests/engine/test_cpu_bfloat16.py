"""bfloat16 on the CPU (`--device cpu --dtype bfloat16`, AMX matrix units
where the CPU has them) against the default float32, which keeps HF parity:
what it costs in accuracy on the embedded model, bounded."""

from __future__ import annotations

import inspect
import textwrap

import torch

from pagewire.services.common.model import resolve_model
from pagewire.services.engine.executor.loader import load_model
from tests.engine.accuracy import agreement, sequence_logits

POSITIONS = 256


def test_bfloat16_logits_stay_close_to_float32_on_the_embedded_model(engine_model, hf_tokenizer) -> None:
    tokens = hf_tokenizer(inspect.getsource(textwrap))["input_ids"][:POSITIONS]
    reference = sequence_logits(engine_model, tokens, torch.float32)
    bfloat16 = load_model(resolve_model(""), torch.device("cpu"), torch.bfloat16)
    measured = agreement(sequence_logits(bfloat16, tokens, torch.bfloat16), reference)
    # Measured on the first 1024 tokens: relative error 0.011, top-1 agreement 0.968.
    assert measured.relative_error < 0.03, measured
    assert measured.top1 > 0.93, measured
