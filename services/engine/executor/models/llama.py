"""The decoder of the Llama family and its relatives (Llama 2/3.x and SmolLM2
as they are, Qwen2 with its qkv bias, Qwen3 with a per-head RMSNorm of q and
k before rotary, Mistral with a sliding attention window, Mixtral and
Qwen3-MoE with mixture-of-experts layers in place of the MLP) over a
flattened batch: the tokens of every scheduled sequence, prefill chunks and
decodes alike, go through each GEMM together, and attention reads the paged
KV cache through the backend."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import re

import torch
from torch import nn

from pagewire.services.engine.executor.backend import AttentionMetadata, KernelBackend
from pagewire.services.engine.executor.parallel import all_reduce, embedding, gather_vocab, vocab_shard
from pagewire.services.engine.executor.layers.linear import PrepackedLinear, can_prepack, linear, prepack_projections, project
from pagewire.services.engine.executor.layers.moe import MoE
from pagewire.services.engine.executor.layers.norm import RMSNorm
from pagewire.services.engine.executor.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]
    rope_scaling: dict[str, Any] | None = None
    # Weight format of the decoder layers' projections (layers/linear.py); lm_head stays unquantized.
    quantization: str = "none"
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before rotary
    sliding_window: int = 0  # Mistral: each query sees only the last sliding_window keys (0: all)
    # Mixture of experts (0 experts: a dense MLP everywhere): how many experts take each token,
    # their intermediate size, whether their router weights are renormalised over those taken,
    # and the layers that keep a dense MLP (Qwen3-MoE's mlp_only_layers and decoder_sparse_step).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    dense_layers: tuple[int, ...] = ()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, backend: KernelBackend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q, k and v in one GEMM; the loader stacks the checkpoint's three matrices.
        self.qkv_proj = linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias, quantization=config.quantization)
        self.o_proj = linear(self.q_size, config.hidden_size, quantization=config.quantization)
        self.rotary = rotary
        self.backend = backend
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        # Dequantization scales of an FP8 KV cache (ignored by a 16/32-bit one); the loader
        # sets them from the checkpoint's k_scale/v_scale when it has them.
        self.k_scale = self.v_scale = 1.0
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, backend)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, backend)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim))[0].view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim))[0].view_as(k)
        q, k = self.rotary(positions, q, k)
        key_cache, value_cache = kv_cache
        self.backend.reshape_and_cache(k, v, key_cache, value_cache, metadata.slot_mapping, k_scale=self.k_scale, v_scale=self.v_scale)
        out = self.backend.paged_attention(
            q, key_cache, value_cache, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc, self.scale,
            max_query_len=metadata.max_query_len, max_seq_len=metadata.max_seq_len, k_scale=self.k_scale, v_scale=self.v_scale,
            sliding_window=self.sliding_window,
        )  # fmt: skip
        return all_reduce(self.o_proj(out.reshape(num_tokens, self.q_size)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, backend: KernelBackend):
        super().__init__()
        self.backend = backend
        self.gate_up_proj = linear(config.hidden_size, 2 * config.intermediate_size, quantization=config.quantization)
        self.down_proj = linear(config.intermediate_size, config.hidden_size, quantization=config.quantization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.down_proj(self.backend.silu_and_mul(self.gate_up_proj(x))))


def feed_forward(config: ModelConfig, layer: int, backend: KernelBackend) -> nn.Module:
    """The layer's MLP, or its mixture of experts."""
    if not config.num_experts or layer in config.dense_layers:
        return MLP(config, backend)
    c = config
    return MoE(c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, backend)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, backend: KernelBackend, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.self_attn = Attention(config, rotary, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.mlp = feed_forward(config, layer, backend)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): each add joins
        the next norm, so the stream is summed inside the fused norm kernel."""
        normed, residual = self.input_layernorm(hidden, residual)
        normed, residual = self.post_attention_layernorm(self.self_attn(positions, normed, kv_cache, metadata), residual)
        return self.mlp(normed), residual


class LlamaBackbone(nn.Module):
    def __init__(self, config: ModelConfig, backend: KernelBackend, max_positions: int):
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, max_positions, backend)
        self.layers = nn.ModuleList(DecoderLayer(config, self.rotary, backend, layer) for layer in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)


# Checkpoint names stacked into one parameter: (part, fused name, index of the part).
STACKED_PARAMS = [
    ("q_proj", "qkv_proj", 0),
    ("k_proj", "qkv_proj", 1),
    ("v_proj", "qkv_proj", 2),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
]
# One expert's tensor in a checkpoint (Mixtral's w1/w3/w2 under block_sparse_moe,
# Qwen3-MoE's gate/up/down_proj): the experts' 3D parameter it fills, and its part
# there (None: all of the expert's rows). Fused 3D tensors load as they are.
EXPERT_TENSOR = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(\w+)\.weight")
EXPERT_PARTS = {
    "w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1), "up_proj": ("gate_up_proj", 1),
    "w2": ("down_proj", None), "down_proj": ("down_proj", None),
}  # fmt: skip


@dataclass(frozen=True)
class Piece:
    """Where one checkpoint tensor goes: a parameter, one expert of it (None:
    not per expert), and one stacked part of that (None: all its rows)."""

    param: str
    expert: int | None = None
    part: int | None = None

    @classmethod
    def of(cls, name: str) -> Piece:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        expert = EXPERT_TENSOR.fullmatch(name)
        if expert is not None and expert.group(3) in EXPERT_PARTS:
            fused, part = EXPERT_PARTS[expert.group(3)]
            return cls(f"{expert.group(1)}.{fused}", int(expert.group(2)), part)
        for part_name, fused, index in STACKED_PARAMS:
            if f".{part_name}." in name:
                return cls(name.replace(part_name, fused), part=index)
        return cls(name)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backend: KernelBackend, max_positions: int):
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config, backend, max_positions)
        if not config.tie_word_embeddings:
            self.lm_head = linear(config.hidden_size, vocab_shard(config.vocab_size).size)
        self.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] before the final norm."""
        hidden, residual = self.model.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        return hidden + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of the given rows (only those whose next token is sampled)."""
        normed, _ = self.model.norm(hidden)
        # A tied model has an lm_head module only once prepack_for_cpu gave it a packed copy of the embedding.
        logits = self.lm_head(normed) if "lm_head" in self._modules else project(normed, self.model.embed_tokens.weight)
        return gather_vocab(logits, self.config.vocab_size).float()

    def prepack_for_cpu(self) -> None:
        """Every projection and the LM head through oneDNN over prepacked
        weights (layers/linear.py), where this model's weights allow it. A
        tied head gets a packed copy of the embedding, which keeps its own."""
        embedding_weight = self.model.embed_tokens.weight
        if "lm_head" not in self._modules and can_prepack(embedding_weight):
            self.lm_head = PrepackedLinear(embedding_weight)
        prepack_projections(self)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) in, stacking q/k/v and gate/up and
        gathering each expert's tensors into the experts' 3D parameters; every
        parameter must be filled completely."""
        params = dict(self.named_parameters())
        filled: dict[str, set[tuple[int | None, int | None]]] = {name: set() for name in params}
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            piece = Piece.of(name)
            if piece.param not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the {self.config.architecture} model")
            destination = params[piece.param].data
            if piece.expert is not None:
                destination = destination[piece.expert]
            if piece.part is not None:
                sizes = self._part_sizes(piece.param, destination.shape[0])
                destination = destination[sum(sizes[: piece.part]) : sum(sizes[: piece.part + 1])]
            if destination.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(destination.shape)}")
            destination.copy_(tensor)
            filled[piece.param].add((piece.expert, piece.part))
        # A parameter is filled by one whole tensor, or by every expert's every part.
        missing = [name for name, got in filled.items() if (None, None) not in got and len(got) < self._num_pieces(name, params[name])]
        if missing:
            raise ValueError(f"checkpoint lacks tensors for: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")

    def _part_sizes(self, name: str, rows: int) -> list[int]:
        """Row counts of the checkpoint tensors stacked into a parameter (of one expert) of `rows` rows."""
        c = self.config
        if ".qkv_proj." in name:
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        if "gate_up_proj" in name:
            return [rows // 2, rows // 2]
        return [rows]

    def _num_pieces(self, name: str, param: torch.Tensor) -> int:
        if ".experts." in name:
            return param.shape[0] * len(self._part_sizes(name, param.shape[1]))
        return len(self._part_sizes(name, param.shape[0]))
