"""Load a Llama-family model from a HF directory (config.json + safetensors)
or a GGUF file (dequantized to the compute dtype)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pagewire.services.common.logging import get_logger
from pagewire.services.common.model import ModelSource
from pagewire.services.engine.executor import parallel
from pagewire.services.engine.executor.backend import KernelBackend, select_backend
from pagewire.services.engine.executor.fp8_checkpoint import WeightStream, layer_format, read_checkpoint_quantization
from pagewire.services.engine.executor.models.llama import LlamaForCausalLM, ModelConfig

if TYPE_CHECKING:
    from pagewire.services.engine.executor.gguf_file import GGUFFile

log = get_logger("engine")

SUPPORTED_ARCHITECTURES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe"}
# Architectures whose attention normalises each head of q and k before rotary.
QK_NORM_ARCHITECTURES = {"qwen3", "qwen3_moe"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    model_id: str
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _sliding_window(raw: dict[str, Any]) -> int:
    """The attention window of every layer, 0 for none. Qwen configs carry a
    window that applies only with use_sliding_window; Mistral's applies
    whenever it is set. A window as long as the context is none at all."""
    window = raw.get("sliding_window") or 0
    if not window or raw.get("use_sliding_window") is False or window >= raw.get("max_position_embeddings", window + 1):
        return 0
    if "full_attention" in (raw.get("layer_types") or ()):
        raise ValueError("models with both sliding-window and full attention layers (layer_types) are not supported")
    return int(window)


def _experts(raw: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields: Mixtral names its expert count
    num_local_experts and always renormalises the top-k weights; Qwen3-MoE
    says num_experts and norm_topk_prob, and keeps a dense MLP in the layers
    of mlp_only_layers and those off every decoder_sparse_step-th."""
    num_experts = raw.get("num_local_experts") or raw.get("num_experts") or 0
    if not num_experts:
        return {}
    step, dense = raw.get("decoder_sparse_step") or 1, set(raw.get("mlp_only_layers") or ())
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": raw["num_experts_per_tok"],
        "moe_intermediate_size": raw.get("moe_intermediate_size") or raw["intermediate_size"],
        "norm_topk_prob": raw.get("norm_topk_prob", True),
        "dense_layers": tuple(i for i in range(raw["num_hidden_layers"]) if i in dense or (i + 1) % step),
    }


def read_hf_config(directory: Path) -> ModelConfig:
    raw = json.loads((directory / "config.json").read_text())
    architecture = raw.get("model_type", "")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"model type {architecture!r} is not supported (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    # transformers 5 writes rope settings under rope_parameters; older files use rope_theta/rope_scaling.
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    eos = _as_id_tuple(raw.get("eos_token_id"))
    generation_config = directory / "generation_config.json"
    if generation_config.is_file():
        eos = tuple(dict.fromkeys(eos + _as_id_tuple(json.loads(generation_config.read_text()).get("eos_token_id"))))
    num_heads = raw["num_attention_heads"]
    return ModelConfig(
        architecture=architecture,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=raw.get("rope_theta", rope.get("rope_theta", 10000.0)),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        qkv_bias=architecture == "qwen2" or raw.get("attention_bias", False),
        eos_token_ids=eos,
        rope_scaling=scaling,
        qk_norm=architecture in QK_NORM_ARCHITECTURES,
        sliding_window=_sliding_window(raw),
        **_experts(raw),
    )


def _safetensors_weights(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors files")
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                yield name, f.get_tensor(name)


# GGUF architectures read (llama.cpp writes Mistral and Mixtral as llama), and
# the model types they are here.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}


def read_gguf_config(reader: GGUFFile) -> ModelConfig:
    meta = reader.metadata
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(GGUF_ARCHITECTURES))})")
    num_heads = meta.get(f"{arch}.attention.head_count")
    hidden = meta.get(f"{arch}.embedding_length")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    names = {t.name for t in reader.tensors}
    num_layers = meta.get(f"{arch}.block_count")
    num_experts = meta.get(f"{arch}.expert_count", 0)
    experts = {}
    if num_experts:
        # Layers without a router keep a dense MLP (Qwen3-MoE's mlp_only_layers).
        experts = dict(
            num_experts=num_experts,
            num_experts_per_tok=meta.get(f"{arch}.expert_used_count"),
            moe_intermediate_size=meta.get(f"{arch}.expert_feed_forward_length") or meta.get(f"{arch}.feed_forward_length"),
            norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", True)),
            dense_layers=tuple(i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" not in names),
        )
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta.get(f"{arch}.feed_forward_length"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=meta.get(f"{arch}.attention.head_count_kv", num_heads),
        # Qwen3 gives its head size as key_length, apart from hidden / heads.
        head_dim=meta.get(f"{arch}.attention.key_length")
        or meta.get(f"{arch}.rope.dimension_count", hidden // num_heads),
        rms_norm_eps=meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=meta.get(f"{arch}.rope.freq_base", 10000.0),
        max_position_embeddings=meta.get(f"{arch}.context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        eos_token_ids=_as_id_tuple(meta.get("tokenizer.ggml.eos_token_id")),
        qk_norm=GGUF_ARCHITECTURES[arch] in QK_NORM_ARCHITECTURES,
        **experts,
    )


GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}
# A mixture-of-experts layer's experts, one 3D tensor [experts, rows, columns] each part.
GGUF_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _undo_llama_cpp_rope_permutation(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    # llama.cpp's converter interleaves the two rotary halves of each q/k head;
    # put them back in HF's rotate-half order.
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gguf_weights(reader: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import dequantize

    for tensor in reader.tensors:
        name = GGUF_GLOBAL_NAMES.get(tensor.name)
        weight = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
        if name is None:
            match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", tensor.name)
            if match is not None and match.group(2) in GGUF_EXPERT_NAMES:
                part = GGUF_EXPERT_NAMES[match.group(2)]
                for expert, rows in enumerate(weight):
                    yield f"model.layers.{match.group(1)}.mlp.experts.{expert}.{part}.weight", rows
                continue
            if match is None or match.group(2) not in GGUF_LAYER_NAMES:
                raise ValueError(f"GGUF tensor {tensor.name!r} is not part of a supported Llama-family model")
            name = f"model.layers.{match.group(1)}.{GGUF_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
        if config.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            weight = _undo_llama_cpp_rope_permutation(weight, config.num_heads if ".q_proj." in name else config.num_kv_heads)
        yield name, weight


def cast_to_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter and buffer in `dtype`, except those a
    quantized layer keeps in its own (its KEEPS_DTYPE names)."""
    for module in model.modules():
        kept = getattr(module, "KEEPS_DTYPE", ())
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if name not in kept and tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)


def _gguf_reader(source: ModelSource) -> GGUFFile:
    from pagewire.services.engine.executor.gguf_file import GGUFFile

    return GGUFFile(source.directory / source.gguf_file)


def read_model_config(source: ModelSource) -> ModelConfig:
    """The model's shapes, without loading its weights."""
    return read_gguf_config(_gguf_reader(source)) if source.is_gguf else read_hf_config(source.directory)


def load_model(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int | None = None,
    backend: KernelBackend | None = None,
    quantization: str = "auto",
) -> LoadedModel:
    """Build the model on `device` in `dtype` with RoPE tables for max_positions
    (default: the model's context length) and fill it from the checkpoint;
    `quantization` is --quantization (fp8_checkpoint.py)."""
    if source.is_gguf:
        reader = _gguf_reader(source)
        config = read_gguf_config(reader)
        weights = _gguf_weights(reader, config)
    else:
        config = read_hf_config(source.directory)
        weights = _safetensors_weights(source.directory)
    # With tensor parallelism, this rank's shapes and its slices of the weights.
    weights = parallel.shard_weights(config, weights)
    config = parallel.rank_config(config)
    checkpoint_quantization = None if source.is_gguf else read_checkpoint_quantization(source.directory)
    stream = WeightStream(layer_format(quantization, checkpoint_quantization), checkpoint_quantization, device)
    config = dataclasses.replace(config, quantization=stream.layer_format)
    # Built on the meta device so no time goes into random initialisation.
    with torch.device("meta"):
        model = LlamaForCausalLM(config, backend or select_backend(device), max_positions or config.max_position_embeddings)
    model = model.to_empty(device=device)
    cast_to_compute_dtype(model, dtype)
    model.load_weights(stream(weights))
    for (layer, which), scale in stream.kv_scales.items():
        setattr(model.model.layers[layer].self_attn, f"{which}_scale", scale)
    model.model.rotary.compute_tables(device)
    log.info(
        "model loaded", model_id=source.model_id, architecture=config.architecture, device=str(device), dtype=dtype_name(dtype),
        quantization=config.quantization, checkpoint_kv_scales=bool(stream.kv_scales),
    )  # fmt: skip
    return LoadedModel(model.eval(), config, source.model_id, device, dtype)
