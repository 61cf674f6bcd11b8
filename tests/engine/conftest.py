"""Engine fixtures: the engine's own load of the embedded model (once per run),
a prompt set, and HF transformers' greedy continuations of it."""

from __future__ import annotations

import pytest
import torch

from pagewire.services.engine.executor.loader import LoadedModel, load_model
from tests.engine import util
from tests.engine.util import MAX_NEW_TOKENS

PROMPT_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "1, 2, 3, 4,",
    "Water boils at",
    "The three primary colours are",
    "import numpy as np\n",
    "Q: What is the largest planet in our solar system?\nA:",
    # Long enough to span several blocks and prefill chunks.
    "In the beginning of the nineteenth century, the small harbour town was known for its fishing fleet, its "
    "lighthouse and a market that drew traders from the whole coast. Every spring the boats were repainted, the nets "
    "were mended on the quay, and the children of the town raced along the sea wall to watch the first catch come "
    "in. The story that follows began on one such morning, when",
]


@pytest.fixture(params=[True, False], ids=["async", "sync"])
def both_schedulings(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run the test with overlapped steps and without: make_engine follows it."""
    monkeypatch.setattr(util, "ASYNC_SCHEDULING", request.param)
    return request.param


@pytest.fixture(scope="session")
def engine_model(model_source) -> LoadedModel:
    return load_model(model_source, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def prompts(hf_tokenizer) -> list[list[int]]:
    chat = [
        hf_tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        for text in ("Say hello.", "Name a colour.", "What is 2+2?")
    ]
    return [hf_tokenizer(text)["input_ids"] for text in PROMPT_TEXTS + chat]


@pytest.fixture(scope="session")
def hf_greedy(hf_model, prompts) -> list[list[int]]:
    """HF generate, one prompt at a time (no padding), greedy."""
    outputs = []
    with torch.inference_mode():
        for ids in prompts:
            generated = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=2)
            outputs.append(generated[0, len(ids) :].tolist())
    return outputs
