"""The GPU engine (CUDA kernels, decode steps in CUDA graphs, chunked prefill
run eagerly) generates HF transformers' greedy continuations of the same
random SmolLM2-135M-shaped checkpoint, loaded from safetensors.

Both run in bf16 with different kernels, so on random weights a near-tie
between the two best logits can flip one token; as in vLLM's model tests, a
continuation may leave HF's only where its token is among HF's top three at
that step, and most tokens must match exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.engine.config import EngineConfig
from services.engine.cuda_graphs import CudaGraphRunner
from services.engine.engine import EngineCore
from services.engine.sequence import SamplingParams

pytestmark = pytest.mark.gpu

SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
)  # fmt: skip
PROMPT_LENS = [1, 5, 17, 33, 64, 100, 150, 250, 7, 40]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SMOLLM2_SHAPE, max_position_embeddings=2048, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("random-smollm2")
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(10, SMOLLM2_SHAPE["vocab_size"], (n,), generator=generator).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_greedy(checkpoint: Path, prompts: list[list[int]]) -> list[tuple[list[int], torch.Tensor]]:
    """HF generate, one prompt at a time (no padding): tokens and each step's logits."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).cuda().eval()
    results = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids], device="cuda"), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            )  # fmt: skip
            results.append((out.sequences[0, len(ids) :].tolist(), torch.cat(out.logits).float().cpu()))
    del model
    torch.cuda.empty_cache()
    return results


@pytest.mark.parametrize("max_num_batched_tokens", [64, 4096], ids=["chunked-prefill", "whole-prompts"])
def test_gpu_engine_greedy_matches_hf(checkpoint: Path, prompts, hf_greedy, max_num_batched_tokens: int) -> None:
    config = EngineConfig(
        model=str(checkpoint), device="cuda", dtype="bfloat16", max_model_len=512, num_kv_blocks=512,
        max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens,
    )  # fmt: skip
    core = EngineCore(config)
    assert isinstance(core.runner, CudaGraphRunner)
    # More requests than max_num_seqs: decode batches of several sizes replay graphs.
    for index, ids in enumerate(prompts):
        core.add_request(f"r{index}", ids, SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS))
    generated: dict[str, list[int]] = {}
    while core.has_unfinished():
        for output in core.step():
            generated.setdefault(output.request_id, []).extend(output.new_token_ids)

    matched = 0
    for index, (expected, logits) in enumerate(hf_greedy):
        actual = generated[f"r{index}"]
        assert len(actual) == MAX_NEW_TOKENS
        first_difference = next((step for step, (a, e) in enumerate(zip(actual, expected)) if a != e), len(expected))
        matched += first_difference
        if first_difference < len(expected):
            top3 = logits[first_difference].topk(3).indices.tolist()
            assert actual[first_difference] in top3, f"prompt {index}, step {first_difference}: {actual[first_difference]} not in {top3}"
    assert matched >= 0.75 * MAX_NEW_TOKENS * len(prompts), f"only {matched} tokens before the first differences"
