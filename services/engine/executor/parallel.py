"""Tensor parallelism: how a model is split over the ranks of one engine, and
the collectives the split layers need.

Query heads are split by KV group, so every rank attends over whole groups:
with at most as many ranks as KV heads, each rank holds a contiguous run of
KV heads (as even as the count allows) and the query heads that read them;
with more ranks, each KV head is replicated on size / num_kv_heads ranks,
each holding its share of that head's queries. The MLP's intermediate
features and the vocabulary are split evenly (the vocabulary padded to a
multiple of the size). QKV and gate/up are column-parallel (each rank
computes its own features), o_proj and down_proj row-parallel (partial sums,
then an all-reduce), the embedding and lm_head vocabulary-parallel.

One process holds one rank; the state below is that process's rank, set once
by `initialize` before the model is built. With a size of 1 every function
here is the identity, so a single device runs the code it always ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from pagewire.services.engine.executor.models.llama import ModelConfig


@dataclass(frozen=True)
class Shard:
    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class HeadShard:
    q: Shard
    kv: Shard


@dataclass
class TensorParallelState:
    rank: int = 0
    size: int = 1
    # Host-side messages (the step plans) go over gloo even when the device
    # collectives use NCCL.
    cpu_group: Any = None


_state = TensorParallelState()


def current() -> TensorParallelState:
    return _state


def initialize(rank: int, size: int, address: str, device: torch.device) -> None:
    """Join the engine's process group; every rank calls this once, before
    building its model. NCCL for CUDA tensors, gloo on the CPU."""
    if dist.is_initialized():
        raise RuntimeError("this process already holds a tensor-parallel rank; one tensor-parallel engine runs per process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=size)
    _state.rank, _state.size = rank, size
    _state.cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _state.rank, _state.size, _state.cpu_group = 0, 1, None


def split_evenly(total: int, parts: int, index: int) -> Shard:
    base, extra = divmod(total, parts)
    return Shard(index * base + min(index, extra), base + (index < extra))


def head_shard(num_heads: int, num_kv_heads: int, size: int, rank: int) -> HeadShard:
    """The query and KV heads of `rank`; ValueError naming the sizes that work
    when the heads cannot be split over `size` ranks."""
    if size <= num_kv_heads:
        groups = split_evenly(num_kv_heads, size, rank)
        per_group = num_heads // num_kv_heads
        return HeadShard(Shard(groups.start * per_group, groups.size * per_group), groups)
    if size % num_kv_heads or num_heads % size:
        raise ValueError(
            f"--tensor-parallel-size {size} cannot split {num_heads} query heads over {num_kv_heads} KV heads: use a size of at most "
            f"{num_kv_heads}, or a multiple of {num_kv_heads} that divides {num_heads}"
        )
    per_rank = num_heads // size
    return HeadShard(Shard(rank * per_rank, per_rank), Shard(rank // (size // num_kv_heads), 1))


def check_splittable(config: ModelConfig, size: int) -> None:
    """Refuse, before any process starts, a model that `size` ranks cannot split."""
    if config.num_experts:
        raise ValueError(f"--tensor-parallel-size {size}: mixture-of-experts layers ({config.architecture}) are not split over ranks yet; use 1")
    head_shard(config.num_heads, config.num_kv_heads, size, 0)
    if size > config.intermediate_size or size > config.vocab_size:
        raise ValueError(f"--tensor-parallel-size {size} is larger than the model's MLP width or vocabulary")


def rank_config(config: ModelConfig) -> ModelConfig:
    """The shapes this rank builds: its heads and intermediate features
    (vocab_size stays the model's; the vocabulary layers split it themselves)."""
    if _state.size == 1:
        return config
    heads = head_shard(config.num_heads, config.num_kv_heads, _state.size, _state.rank)
    intermediate = split_evenly(config.intermediate_size, _state.size, _state.rank)
    return dataclasses.replace(config, num_heads=heads.q.size, num_kv_heads=heads.kv.size, intermediate_size=intermediate.size)


def vocab_shard(vocab_size: int) -> Shard:
    """This rank's rows of the embedding and lm_head: every rank holds
    ceil(vocab / size) rows, the last ones padding past the vocabulary."""
    rows = -(-vocab_size // _state.size)
    start = _state.rank * rows
    return Shard(start, rows)


def shard_checkpoint_tensor(config: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of checkpoint tensor `name` (HF names) of a model
    whose whole shapes are `config`: rows of the column-parallel and
    vocabulary-parallel layers, input columns of the row-parallel ones; a
    scalar (a per-tensor scale) and every other tensor whole."""
    if _state.size == 1 or tensor.ndim == 0:
        return tensor
    heads = head_shard(config.num_heads, config.num_kv_heads, _state.size, _state.rank)
    intermediate = split_evenly(config.intermediate_size, _state.size, _state.rank)
    d = config.head_dim
    q, kv = Shard(heads.q.start * d, heads.q.size * d), Shard(heads.kv.start * d, heads.kv.size * d)
    dim, shard, whole = 0, None, 0
    if ".q_proj." in name:
        shard, whole = q, config.num_heads * d
    elif ".k_proj." in name or ".v_proj." in name:
        shard, whole = kv, config.num_kv_heads * d
    elif ".gate_proj." in name or ".up_proj." in name:
        shard, whole = intermediate, config.intermediate_size
    elif name.endswith(".o_proj.weight"):
        dim, shard, whole = 1, q, config.num_heads * d
    elif name.endswith(".down_proj.weight"):
        dim, shard, whole = 1, intermediate, config.intermediate_size
    elif name in ("model.embed_tokens.weight", "lm_head.weight"):
        vocab = vocab_shard(config.vocab_size)
        rows = tensor[vocab.start : vocab.stop]
        return F.pad(rows, (0, 0, 0, vocab.size - rows.shape[0]))
    if shard is None or (tensor.ndim == 1 and tensor.numel() == 1):
        return tensor
    if tensor.shape[dim] != whole:
        raise ValueError(f"tensor parallelism cannot split checkpoint tensor {name!r} of shape {tuple(tensor.shape)} (dimension {dim} is not {whole})")
    return tensor.narrow(dim, shard.start, shard.size)


def shard_weights(config: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors as this rank holds them."""
    for name, tensor in weights:
        yield name, shard_checkpoint_tensor(config, name, tensor)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum a row-parallel layer's partial outputs over the ranks, in place."""
    if _state.size > 1:
        dist.all_reduce(x)
    return x


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Every rank's slice of the vocabulary side by side, the padding dropped."""
    if _state.size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(_state.size)]
    dist.all_gather(parts, logits.contiguous())
    return torch.cat(parts, dim=-1)[:, :vocab_size]


class VocabParallelEmbedding(nn.Embedding):
    """An embedding holding this rank's rows of the vocabulary: ids outside
    them give zeros, and the sum over the ranks is the full lookup."""

    def __init__(self, vocab_size: int, hidden_size: int):
        shard = vocab_shard(vocab_size)
        super().__init__(shard.size, hidden_size)
        self.shard = shard

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.shard.start
        outside = (local < 0) | (local >= self.shard.size)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return all_reduce(hidden)


def embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    """The token embedding: the whole table on one rank, this rank's rows with several."""
    return nn.Embedding(vocab_size, hidden_size) if _state.size == 1 else VocabParallelEmbedding(vocab_size, hidden_size)


def broadcast_object(value: Any = None) -> Any:
    """Rank 0's `value` on every rank (host data: step plans, sizes)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_state.cpu_group)
    return box[0]


def broadcast_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor into `tensor` on every rank (queued on the device stream with NCCL)."""
    dist.broadcast(tensor, src=0)
    return tensor


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, on every rank."""
    values: list[Any] = [None] * _state.size
    dist.all_gather_object(values, value, group=_state.cpu_group)
    return values


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a rank's parameters (its shard of the weights)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
