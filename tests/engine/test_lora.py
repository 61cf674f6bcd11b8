"""Multi-LoRA serving: in one batch mixing the base model and two adapters,
each request's greedy output equals HF transformers + PEFT with its adapter;
adapters swap through fewer device slots than adapters; K/V is never shared
across adapters by the prefix cache; adapters load and unload at run time;
what cannot be served is refused with the reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pagewire.kernels import reference
from pagewire.services.common.errors import Refusal, RequestError
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.executor.layers.lora import LoraContext, LoraLinear
from pagewire.services.engine.executor.model_executor import create_engine_core
from tests.engine import tiny_models
from tests.engine.util import assert_no_leaks, greedy, run_all, tokens_of
from tests.support.lora_adapters import ALL_TARGETS, prompt, write_adapter

MAX_NEW_TOKENS = 10
BLOCK_SIZE = 4
# name -> (rank, alpha, targets, use_rslora)
ADAPTERS = {
    "all8": (8, 16, ALL_TARGETS, False),
    "qv4": (4, 12, ["q_proj", "v_proj", "down_proj"], True),
}


def _adapters_of(base: PreTrainedModel, root: Path) -> tuple[Path, dict[str, Path], dict[str, PreTrainedModel]]:
    """The base model's directory, each adapter's directory, and the HF
    reference of each ("" for the base model)."""
    base.save_pretrained(root / "base")
    paths, references = {}, {"": base}
    for seed, (name, (rank, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        paths[name] = root / name
        write_adapter(base, paths[name], rank, alpha, targets, seed, rslora)
        references[name] = PeftModel.from_pretrained(copy.deepcopy(base), paths[name]).eval()
    return root / "base", paths, references


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict[str, PreTrainedModel]]:
    torch.manual_seed(0)
    return _adapters_of(tiny_models.llama3_scaled().eval(), tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def gpu_lora_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict[str, PreTrainedModel]]:
    # The CUDA attention kernels take head_dim 64 or 128: 256 wide over 4 heads.
    torch.manual_seed(0)
    config = LlamaConfig(**(tiny_models.TINY | {"hidden_size": 256, "intermediate_size": 512}), tie_word_embeddings=False)
    return _adapters_of(LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("lora-gpu"))


def _engine(lora_setup, **overrides) -> EngineCore:
    base, paths, _ = lora_setup
    settings = dict(
        model=str(base), device="cpu", num_kv_blocks=256, block_size=BLOCK_SIZE, max_lora_rank=8,
        lora=[f"{name}={path}" for name, path in paths.items()],
    ) | overrides  # fmt: skip
    return create_engine_core(EngineConfig(**settings))


@pytest.mark.parametrize(("max_loras", "async_scheduling"), [(2, True), (2, False), (1, True)], ids=["2-slots", "2-slots-sync", "1-slot-swapping"])
def test_mixed_batch_equals_peft(lora_setup, max_loras: int, async_scheduling: bool) -> None:
    references = lora_setup[2]
    core = _engine(lora_setup, max_loras=max_loras, async_scheduling=async_scheduling, max_num_batched_tokens=24)
    # Base and adapters interleaved; the same prompt under every adapter too.
    requests = [(name, prompt(length=13 + i, seed=i)) for i, name in enumerate(["", "all8", "qv4"] * 2)]
    requests += [(name, prompt(seed=99)) for name in ["qv4", "", "all8"]]
    for i, (name, ids) in enumerate(requests):
        core.add_request(f"r{i}", ids, greedy(MAX_NEW_TOKENS), lora=name)
    outputs = run_all(core)
    for i, (name, ids) in enumerate(requests):
        assert tokens_of(outputs[f"r{i}"]) == tiny_models.hf_greedy(references[name], ids, MAX_NEW_TOKENS), f"request r{i} ({name or 'base'})"
    same_prompt = [tokens_of(outputs[f"r{i}"]) for i in range(6, 9)]
    assert len({tuple(tokens) for tokens in same_prompt}) == 3, "the adapters should change the output"
    assert_no_leaks(core)


def test_prefix_cache_is_per_adapter(lora_setup) -> None:
    core = _engine(lora_setup)
    ids = prompt(seed=7)

    def cached_tokens(request_id: str, name: str) -> int:
        core.add_request(request_id, ids, greedy(2), lora=name)
        return run_all(core)[request_id][0].num_cached_tokens

    assert cached_tokens("base", "") == 0
    assert cached_tokens("all8", "all8") == 0  # the base model's blocks hold other K/V
    assert cached_tokens("qv4", "qv4") == 0
    assert cached_tokens("all8-again", "all8") > 0
    assert cached_tokens("base-again", "") > 0
    # A reloaded adapter may have other weights: its old blocks are not reused.
    core.load_lora_adapter("all8", str(lora_setup[1]["all8"]))
    assert cached_tokens("all8-reloaded", "all8") == 0
    assert_no_leaks(core)


def test_load_and_unload_at_run_time(lora_setup) -> None:
    _, paths, references = lora_setup
    core = _engine(lora_setup, lora=[], enable_lora=True, max_loras=1)
    ids = prompt(seed=3)
    with pytest.raises(RequestError) as unknown:
        core.add_request("r0", ids, greedy(MAX_NEW_TOKENS), lora="qv4")
    assert unknown.value.kind is Refusal.NOT_FOUND and "'qv4'" in unknown.value.message
    core.load_lora_adapter("qv4", str(paths["qv4"]))
    assert core.info.lora_adapters == ("qv4",)
    core.add_request("r1", ids, greedy(MAX_NEW_TOKENS), lora="qv4")
    core.add_request("r2", ids, greedy(MAX_NEW_TOKENS))
    core.step()
    stats = core.stats()
    assert (stats.running_lora_adapters, stats.waiting_lora_adapters, stats.max_loras) == (("qv4",), (), 1)
    with pytest.raises(RequestError) as in_use:
        core.unload_lora_adapter("qv4")
    assert in_use.value.kind is Refusal.FAILED_PRECONDITION
    outputs = run_all(core)
    assert tokens_of(outputs["r1"]) == tiny_models.hf_greedy(references["qv4"], ids, MAX_NEW_TOKENS)
    assert tokens_of(outputs["r2"]) == tiny_models.hf_greedy(references[""], ids, MAX_NEW_TOKENS)
    core.unload_lora_adapter("qv4")
    assert core.info.lora_adapters == ()
    with pytest.raises(RequestError) as gone:
        core.unload_lora_adapter("qv4")
    assert gone.value.kind is Refusal.NOT_FOUND
    assert_no_leaks(core)


def _edited_copy(source: Path, target: Path, **changes) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    config = json.loads((source / "adapter_config.json").read_text()) | changes
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules"),
        ({"r": 16}, "--max-lora-rank"),
        ({"peft_type": "IA3"}, "LORA"),
    ],
)
def test_unservable_adapters_are_refused(lora_setup, tmp_path: Path, changes: dict, reason: str) -> None:
    core = _engine(lora_setup, lora=[], enable_lora=True)
    path = _edited_copy(lora_setup[1]["qv4"], tmp_path / "edited", **changes)
    with pytest.raises(RequestError) as refused:
        core.load_lora_adapter("bad", str(path))
    assert refused.value.kind is Refusal.INVALID_ARGUMENT and reason in refused.value.message and "'bad'" in refused.value.message
    with pytest.raises(RequestError, match="adapter_config.json"):
        core.load_lora_adapter("missing", str(tmp_path / "nowhere"))
    assert core.info.lora_adapters == ()


def test_damaged_weights_are_refused(lora_setup, tmp_path: Path) -> None:
    core = _engine(lora_setup, lora=[], enable_lora=True)
    path = _edited_copy(lora_setup[1]["qv4"], tmp_path / "damaged")
    (path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RequestError, match="does not load") as refused:
        core.load_lora_adapter("damaged", str(path))
    assert refused.value.kind is Refusal.INVALID_ARGUMENT


def test_engine_without_lora_slots_refuses_loading(lora_setup) -> None:
    core = _engine(lora_setup, lora=[])
    with pytest.raises(RequestError, match="--enable-lora") as refused:
        core.load_lora_adapter("qv4", str(lora_setup[1]["qv4"]))
    assert refused.value.kind is Refusal.FAILED_PRECONDITION


def test_lora_linear_applies_each_tokens_adapter_to_its_part() -> None:
    """Per token: the base projection plus B @ A x of its own slot, each part of a fused projection apart."""
    torch.manual_seed(0)
    parts, rank, slots, hidden = [8, 4, 4], 3, 3, 16
    context = LoraContext(slots, rank, torch.device("cpu"))
    layer = LoraLinear(torch.nn.Linear(hidden, sum(parts), bias=False), hidden, parts, rank, context, torch.float32, torch.device("cpu"))
    weights = {(s, p): (torch.randn(rank - p % 2, hidden), torch.randn(parts[p], rank - p % 2)) for s in range(slots) for p in range(3) if (s + p) % 2}
    for (s, p), (a, b) in weights.items():
        layer.set_part(s, p, a, b)
    x = torch.randn(7, hidden)
    token_slots = torch.tensor([-1, 0, 1, 2, 1, -1, 0])
    context.bind(token_slots)
    expected = layer.base(x).clone()
    for t, s in enumerate(token_slots.tolist()):
        for p in range(3):
            if (s, p) in weights:
                a, b = weights[(s, p)]
                expected[t, sum(parts[:p]) : sum(parts[: p + 1])] += b @ (a @ x[t])
    torch.testing.assert_close(layer(x), expected)
    layer.clear_slot(1)
    context.bind(torch.tensor([1]))
    torch.testing.assert_close(layer(x[:1]), layer.base(x[:1]))


# How far below HF's fp32 argmax pagewire's bf16 token may score on the GPU: random
# tiny models put their top logits this close, and bf16 moves them about as much
# (the tokens of a wrong adapter, or of none, score 0.3 and more below on these models).
BF16_LOGIT_TOLERANCE = 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("lora_kernel", ["dense", "gathered"])
def test_mixed_batch_on_the_gpu_in_decode_graphs(gpu_lora_setup, lora_kernel: str) -> None:
    """The same mixed batch through the CUDA engine in bf16, decodes replaying
    the graphs: at every position pagewire's token is HF + PEFT's fp32 argmax
    over pagewire's own continuation (teacher forcing), or within bf16 noise of it."""
    references = gpu_lora_setup[2]
    core = _engine(gpu_lora_setup, device="cuda", dtype="bfloat16", max_loras=2, max_num_seqs=16, lora_kernel=lora_kernel)
    assert core.executor.lora.context.kernel == lora_kernel
    requests = [(name, prompt(length=9 + 3 * i, seed=20 + i)) for i, name in enumerate(["", "all8", "qv4"] * 3)]
    for i, (name, ids) in enumerate(requests):
        core.add_request(f"r{i}", ids, greedy(MAX_NEW_TOKENS), lora=name)
    outputs = run_all(core)
    assert core.executor.runner.num_graph_launches > 0
    for i, (name, ids) in enumerate(requests):
        tokens = tokens_of(outputs[f"r{i}"])
        with torch.inference_mode():
            logits = references[name](torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1].float()
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        shortfall = logits.max(dim=1).values - chosen
        assert shortfall.max() <= BF16_LOGIT_TOLERANCE, f"request r{i} ({name or 'base'}): {shortfall.tolist()}"
    assert_no_leaks(core)


def test_the_cpu_takes_the_dense_path_and_refuses_the_gathered_kernel() -> None:
    assert LoraContext(4, 64, torch.device("cpu")).kernel == "dense"
    assert LoraContext(64, 64, torch.device("cpu"), "dense").add_lora is reference.add_lora
    with pytest.raises(ValueError, match="gathered runs CUDA kernels"):
        LoraContext(4, 16, torch.device("cpu"), "gathered")
