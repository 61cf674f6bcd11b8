"""The GPU engine (CUDA kernels, decode steps in CUDA graphs, the forward
pass of chunked prefill steps in graphs of their own) generates HF transformers' greedy continuations of the same
random SmolLM2-135M-shaped checkpoint, loaded from safetensors, and of small
random Mistral (sliding window), Qwen3, Mixtral and Qwen3-MoE checkpoints.

Both run in bf16 with different kernels, so on random weights, whose logits
sit close together, a near-tie can flip one token and the continuations part.
The check is therefore made at every position: HF is run over the prompt
plus pagewire's own continuation (teacher forcing), and pagewire's token must
be HF's argmax, except where HF's margin between the two is within the noise
of bf16 itself, measured as how far HF's bf16 logits stand from HF's fp32
logits at that position."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.executor.cuda_graphs import CudaGraphRunner
from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.executor.model_executor import create_engine_core
from pagewire.services.engine.core.sequence import SamplingParams
from tests.engine.util import mixed_sampling

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
def hf_models(checkpoint: Path):  # type: ignore[no-untyped-def]
    """HF transformers' model on the GPU in bf16 (the reference) and fp32 (to measure bf16 noise)."""
    from transformers import LlamaForCausalLM

    models = {dtype: LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype).cuda().eval() for dtype in (torch.bfloat16, torch.float32)}
    yield models
    models.clear()
    torch.cuda.empty_cache()


@torch.inference_mode()
def check_against_hf(hf_models, prompt: list[int], continuation: list[int]) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(positions where pagewire took HF's argmax, positions excused as bf16
    near-ties); fails on any other position."""
    ids = torch.tensor([prompt + continuation[:-1]], device="cuda")
    rows = slice(len(prompt) - 1, len(prompt) - 1 + len(continuation))
    reference = hf_models[torch.bfloat16](ids).logits[0, rows].float()
    exact = hf_models[torch.float32](ids).logits[0, rows].float()
    agreed = excused = 0
    for step, token in enumerate(continuation):
        best = int(reference[step].argmax())
        if token == best:
            agreed += 1
            continue
        margin = float(reference[step, best] - reference[step, token])
        noise = float((reference[step] - exact[step]).abs().max())
        assert margin <= 2 * noise, f"step {step}: pagewire took {token}, HF {best} by a margin of {margin:.4f} (bf16 noise {noise:.4f})"
        excused += 1
    return agreed, excused


def generate(core: EngineCore, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy continuations of prompts submitted together as r0, r1, ..."""
    for index, ids in enumerate(prompts):
        core.add_request(f"r{index}", ids, SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS))
    generated: dict[str, list[int]] = {}
    while core.has_unfinished():
        for output in core.step():
            generated.setdefault(output.request_id, []).extend(output.new_token_ids)
    return [generated[f"r{index}"] for index in range(len(prompts))]


def assert_matches_hf(hf_models, prompts: list[list[int]], continuations: list[list[int]]) -> None:  # type: ignore[no-untyped-def]
    agreed = excused = 0
    for prompt, continuation in zip(prompts, continuations):
        assert len(continuation) == MAX_NEW_TOKENS
        counts = check_against_hf(hf_models, prompt, continuation)
        agreed, excused = agreed + counts[0], excused + counts[1]
    # Near-ties are rare: a kernel bug shows as many positions, not a few.
    assert excused <= 0.05 * agreed, f"{excused} near-ties excused against {agreed} exact positions"


def gpu_engine(checkpoint: Path, **overrides) -> EngineCore:  # type: ignore[no-untyped-def]
    settings = dict(max_model_len=512, num_kv_blocks=512, max_num_seqs=8, max_num_batched_tokens=4096) | overrides
    core = create_engine_core(EngineConfig(model=str(checkpoint), device="cuda", dtype="bfloat16", **settings))
    assert isinstance(core.executor.runner, CudaGraphRunner) == settings.get("cuda_graphs", True)
    return core


ASYNC = pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])


@ASYNC
@pytest.mark.parametrize("max_num_batched_tokens", [64, 4096], ids=["chunked-prefill", "whole-prompts"])
def test_gpu_engine_greedy_matches_hf(checkpoint: Path, prompts, hf_models, max_num_batched_tokens: int, async_scheduling: bool) -> None:  # type: ignore[no-untyped-def]
    core = gpu_engine(checkpoint, max_num_batched_tokens=max_num_batched_tokens, async_scheduling=async_scheduling)
    # More requests than max_num_seqs: decode batches of several sizes replay graphs.
    assert_matches_hf(hf_models, prompts, generate(core, prompts))
    runner = core.executor.runner
    assert runner.num_graph_launches > 0 and runner.num_prefill_graph_launches > 0


def test_gpu_engine_without_cuda_graphs_matches_hf(checkpoint: Path, prompts, hf_models) -> None:  # type: ignore[no-untyped-def]
    core = gpu_engine(checkpoint, max_num_batched_tokens=64, cuda_graphs=False)
    assert_matches_hf(hf_models, prompts, generate(core, prompts))


@ASYNC
def test_gpu_engine_reused_ids_and_preemption_keep_greedy_output(checkpoint: Path, prompts, hf_models, async_scheduling: bool) -> None:  # type: ignore[no-untyped-def]
    # The decode graphs keep each row's block table between steps; a second
    # wave reuses the first wave's request ids, and a KV cache of 18 blocks
    # preempts part of it (two sequences admitted together outgrow it while
    # decoding), so stale rows would show as wrong tokens.
    core = gpu_engine(checkpoint, num_kv_blocks=18, async_scheduling=async_scheduling)
    first, second = prompts[:5], prompts[5:]
    continuations = generate(core, first) + generate(core, second)
    assert core.stats().num_preemptions > 0
    assert_matches_hf(hf_models, first + second, continuations)


# The other families, SmolLM2-sized but shallower: a sliding window shorter
# than most prompts, q/k norm, and mixture-of-experts layers through grouped
# GEMMs inside the decode graphs.
FAMILY_SHAPE = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    vocab_size=SMOLLM2_SHAPE["vocab_size"], max_position_embeddings=2048, eos_token_id=None, bos_token_id=None, pad_token_id=0,
    tie_word_embeddings=False,
)  # fmt: skip
FAMILIES = {
    "mistral-window": ("MistralConfig", dict(sliding_window=96)),
    "qwen3": ("Qwen3Config", {}),
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gpu_engine_families_match_hf(family: str, prompts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import transformers

    config_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_name)(**FAMILY_SHAPE, **extra)).save_pretrained(tmp_path)
    models = {
        dtype: transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).cuda().eval() for dtype in (torch.bfloat16, torch.float32)
    }
    core = gpu_engine(tmp_path, max_num_batched_tokens=64)
    assert_matches_hf(models, prompts, generate(core, prompts))


def _sampled_outputs(core: EngineCore, prompts: list[list[int]]) -> dict[str, tuple[list[int], list]]:
    """Seeded sampling, penalties, logprobs and a stop token in one batch."""
    variants = mixed_sampling(MAX_NEW_TOKENS)
    for index, ids in enumerate(prompts):
        core.add_request(f"r{index}", ids, variants[index % len(variants)])
    outputs: dict[str, tuple[list[int], list]] = {}
    while core.has_unfinished():
        for output in core.step():
            tokens, logprobs = outputs.setdefault(output.request_id, ([], []))
            tokens.extend(output.new_token_ids)
            logprobs.extend(output.logprobs)
    return outputs


def test_gpu_overlapped_steps_sample_exactly_as_synchronous_ones(checkpoint: Path, prompts) -> None:  # type: ignore[no-untyped-def]
    overlapped = _sampled_outputs(gpu_engine(checkpoint, async_scheduling=True), prompts)
    synchronous = _sampled_outputs(gpu_engine(checkpoint, async_scheduling=False), prompts)
    assert overlapped.keys() == synchronous.keys()
    for request_id, (tokens, logprobs) in synchronous.items():
        assert overlapped[request_id][0] == tokens, request_id
        for mine, theirs in zip(overlapped[request_id][1], logprobs):
            assert mine.token_id == theirs.token_id and abs(mine.logprob - theirs.logprob) < 1e-4


@ASYNC
def test_gpu_speculative_decoding_keeps_greedy_output(checkpoint: Path, prompts, hf_models, async_scheduling: bool) -> None:  # type: ignore[no-untyped-def]
    # Prompts that repeat themselves give prompt lookup something to propose;
    # verify steps replay their own graphs beside decode graphs (steps that
    # also carry prefill chunks replay forward-pass graphs).
    repeated = [ids + ids for ids in prompts[:6]]
    core = gpu_engine(checkpoint, async_scheduling=async_scheduling, speculative_method="ngram", num_speculative_tokens=4, ngram_min=1)
    assert_matches_hf(hf_models, repeated, generate(core, repeated))
    assert core.stats().spec_decode_draft_tokens_total > 0
    assert core.executor.runner.num_verify_graph_launches > 0
    # Rejection sampling on the device: seeded rows, logprobs, one per token.
    core.add_request("sampled", repeated[0], SamplingParams(temperature=0.8, seed=3, logprobs=1, max_tokens=MAX_NEW_TOKENS))
    tokens, logprobs = [], []
    while core.has_unfinished():
        for output in core.step():
            tokens += output.new_token_ids
            logprobs += [lp.token_id for lp in output.logprobs]
    assert len(tokens) == MAX_NEW_TOKENS and logprobs == tokens


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_gpu_draft_model_speculation_keeps_greedy_output(checkpoint: Path, prompts, hf_models, cuda_graphs: bool) -> None:  # type: ignore[no-untyped-def]
    # The checkpoint as its own draft: the draft's passes (catch-up in its
    # forward-pass graphs, decodes in its decode graphs, or all eagerly)
    # propose what the target computes, so nearly every proposal is accepted
    # and the output stays HF's.
    core = gpu_engine(checkpoint, speculative_method="draft", draft_model=str(checkpoint), num_speculative_tokens=3, cuda_graphs=cuda_graphs)
    assert isinstance(core.executor.draft_proposer.runner, CudaGraphRunner) == cuda_graphs
    assert_matches_hf(hf_models, prompts, generate(core, prompts))
    stats = core.stats()
    assert stats.spec_decode_accepted_tokens_total >= 0.8 * stats.spec_decode_draft_tokens_total > 0
