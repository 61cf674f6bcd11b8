"""kernels/lora.cu on torch tensors: the batched LoRA of a projection on the
GPU (kernels/reference.py: lora_shrink, lora_expand, add_lora), launched on
torch's current stream, so a decode step's CUDA graph captures it. The
launch shape depends only on the token count and the weights' shapes, never
on the slots' values, so one captured graph serves any mix of adapters."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from pagewire.kernels import loader

SOURCE = "lora.cu"
KERNEL_TYPES = {torch.bfloat16: "Bf16", torch.float16: "Fp16"}
THREADS = 256  # LORA_THREADS in the source
TOKENS_PER_BLOCK = 16  # LORA_TOKENS
SHRINK_STAGE = 256  # SHRINK_STAGE: input columns per shared-memory stage
# The expand finds a column's part from where parts 1 and 2 start: q/k/v is the widest fusion.
MAX_PARTS = 3
# The shrink splits its input dimension over blocks until about this many
# blocks per multiprocessor run, so a decode step of one token still
# spreads its reads over the device.
SHRINK_BLOCKS_PER_MULTIPROCESSOR = 2
DEFAULT_SHARED_BYTES = 48 * 1024
FLOAT_BYTES = 4


def kernel_names() -> list[str]:
    return [f"lora_{step}_kernel<{kind}>" for kind in KERNEL_TYPES.values() for step in ("shrink", "expand")]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ShrinkLaunch:
    grid: tuple[int, int, int]  # token tiles, input splits, column groups
    k_per_split: int  # a whole number of shared-memory stages
    columns_per_block: int

    @property
    def splits(self) -> int:
        return self.grid[1]


def shrink_launch(num_tokens: int, input_size: int, width: int, multiprocessors: int) -> ShrinkLaunch:
    """How lora_shrink_kernel covers num_tokens rows of input_size and the
    width = parts * rank shrunk columns: blocks of TOKENS_PER_BLOCK tokens and
    up to THREADS columns, the input split into as many whole stages as give
    about SHRINK_BLOCKS_PER_MULTIPROCESSOR blocks per multiprocessor."""
    tiles = _cdiv(max(num_tokens, 1), TOKENS_PER_BLOCK)
    columns = min(width, THREADS)
    column_groups = _cdiv(width, columns)
    stages = _cdiv(input_size, SHRINK_STAGE)
    wanted_splits = _cdiv(SHRINK_BLOCKS_PER_MULTIPROCESSOR * multiprocessors, tiles * column_groups)
    k_per_split = _cdiv(stages, min(stages, wanted_splits)) * SHRINK_STAGE
    return ShrinkLaunch((tiles, _cdiv(input_size, k_per_split), column_groups), k_per_split, columns)


def part_starts(part_sizes: list[int]) -> tuple[int, int]:
    """The output columns where parts 1 and 2 of a fused projection start;
    an absent part starts at the output's width, past every column."""
    if not 1 <= len(part_sizes) <= MAX_PARTS:
        raise ValueError(f"the LoRA kernels take projections of 1 to {MAX_PARTS} fused parts, got {len(part_sizes)}")
    ends = list(itertools.accumulate(part_sizes))
    starts = ends[:-1] + [ends[-1]] * (MAX_PARTS - len(part_sizes))
    return starts[0], starts[1]


def _kind(rows: torch.Tensor, weights: torch.Tensor) -> str:
    """The kernels' type name for rows (x or out: the last dimension contiguous) and weights (contiguous)."""
    if rows.dtype not in KERNEL_TYPES or weights.dtype != rows.dtype:
        raise ValueError(f"the LoRA kernels take bf16 or fp16 tensors of one dtype, got {rows.dtype} and {weights.dtype}")
    if rows.dim() != 2 or rows.stride(-1) != 1 or not weights.is_contiguous():
        raise ValueError("the LoRA kernels take 2-d rows whose last dimension is contiguous, and contiguous weights")
    return KERNEL_TYPES[rows.dtype]


def _pointer(tensor: torch.Tensor) -> np.uint64:
    return np.uint64(tensor.data_ptr())


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] times each token's A, lora_a [in, parts, slots, rank]:
    float32 partial sums [splits, tokens, parts * rank] over the input's
    splits (their sum is reference.lora_shrink), zeros for slot -1."""
    kind = _kind(x, lora_a)
    input_size, num_parts, num_slots, rank = lora_a.shape
    num_tokens, width = x.shape[0], num_parts * rank
    launch = shrink_launch(num_tokens, input_size, width, loader.multiprocessor_count(_device_index(x.device)))
    partial = torch.empty(launch.splits, num_tokens, width, dtype=torch.float32, device=x.device)
    if num_tokens:
        token_slots = token_slots.to(torch.int64).contiguous()
        loader.launch(
            loader.get_kernel(SOURCE, f"lora_shrink_kernel<{kind}>"),
            x.device,
            launch.grid,
            (THREADS,),
            (
                _pointer(partial), _pointer(x), _pointer(lora_a), _pointer(token_slots), np.int32(num_tokens), np.int64(x.stride(0)),
                np.int32(input_size), np.int32(num_parts), np.int32(num_slots), np.int32(rank),
                np.int32(launch.k_per_split), np.int32(launch.columns_per_block),
            ),
        )  # fmt: skip
    return partial


def lora_expand(out: torch.Tensor, partial: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, part_sizes: list[int]) -> torch.Tensor:
    """out [tokens, sum(part_sizes)] plus, in place, each token's part of the
    shrunk row (partial summed over its splits) times its slot's B, lora_b
    [slots, rank, out]; tokens of slot -1 keep their row. Returns out."""
    kind = _kind(out, lora_b)
    num_slots, rank, output_size = lora_b.shape
    num_splits, num_tokens, width = partial.shape
    if output_size != sum(part_sizes) or width != len(part_sizes) * rank or out.shape != (num_tokens, output_size) or not partial.is_contiguous():
        raise ValueError(f"LoRA expand: parts {part_sizes} of rank {rank} do not match B {tuple(lora_b.shape)}, {tuple(partial.shape)} and out {tuple(out.shape)}")
    part1_start, part2_start = part_starts(part_sizes)
    if not num_tokens:
        return out
    shared_bytes = TOKENS_PER_BLOCK * width * FLOAT_BYTES
    kernel = loader.get_kernel(SOURCE, f"lora_expand_kernel<{kind}>", shared_bytes if shared_bytes > DEFAULT_SHARED_BYTES else 0)
    loader.launch(
        kernel,
        out.device,
        (_cdiv(num_tokens, TOKENS_PER_BLOCK), _cdiv(output_size, THREADS)),
        (THREADS,),
        (
            _pointer(out), _pointer(partial), _pointer(lora_b), _pointer(token_slots.to(torch.int64).contiguous()),
            np.int32(num_tokens), np.int64(out.stride(0)), np.int32(output_size), np.int32(num_splits), np.int32(rank), np.int32(width),
            np.int32(part1_start), np.int32(part2_start),
        ),
        shared_bytes,
    )  # fmt: skip
    return out


def add_lora(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, part_sizes: list[int]
) -> torch.Tensor:
    """reference.add_lora on the GPU, in place on out (which it returns)."""
    return lora_expand(out, lora_shrink(x, lora_a, token_slots), lora_b, token_slots, part_sizes)
