"""Compiles this package's CUDA sources with NVRTC through CuPy at first use
and launches them on torch memory, on torch's current stream.

CuPy keeps compiled binaries on disk (~/.cupy/kernel_cache), so a source is
compiled once per machine; the functions here keep each loaded kernel for the
life of the process. CuPy is imported lazily: the CPU paths of pagewire never
need it."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import cupy

KERNEL_DIR = Path(__file__).resolve().parent
# The same flags build every source in the nvcc compile test, so what CI checks
# is what NVRTC builds on the GPU.
COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17", "--use_fast_math")
# A source's #include of a header of this package (kernels/*.cuh).
LOCAL_INCLUDE = re.compile(r'^#include "(\w+\.cuh)"$', re.MULTILINE)


def source_code(source: str) -> str:
    """kernels/<source> with each local header pasted in place of its
    #include: NVRTC is handed one text, and CuPy's cache of compiled
    binaries, keyed by that text, sees a header's edits too."""
    return LOCAL_INCLUDE.sub(lambda match: (KERNEL_DIR / match.group(1)).read_text(), (KERNEL_DIR / source).read_text())


@functools.cache
def _compiled_kernel(source: str, name: str) -> cupy.RawKernel:
    import cupy

    module = cupy.RawModule(
        code=source_code(source),
        options=COMPILE_OPTIONS,
        name_expressions=[name] if "<" in name else None,
    )
    return module.get_function(name)


# Dynamic shared memory a kernel may take per block beyond the default 48 KiB,
# by (source, name). Every launch shape of a kernel shares one function, so
# its limit only ever rises to the largest any launch asks for.
_shared_limits: dict[tuple[str, str], int] = {}


def get_kernel(source: str, name: str, max_dynamic_shared_bytes: int = 0) -> cupy.RawKernel:
    """The kernel `name` (a template instantiation such as
    "combine_splits_kernel<Bf16, 128>" or an extern "C" name) from
    kernels/<source>, allowed at least max_dynamic_shared_bytes of dynamic
    shared memory per block."""
    kernel = _compiled_kernel(source, name)
    if max_dynamic_shared_bytes > _shared_limits.get((source, name), 48 * 1024):
        kernel.max_dynamic_shared_size_bytes = max_dynamic_shared_bytes
        _shared_limits[(source, name)] = max_dynamic_shared_bytes
    return kernel


@functools.cache
def _external_stream(device_index: int, stream_pointer: int) -> cupy.cuda.ExternalStream:
    import cupy

    return cupy.cuda.ExternalStream(stream_pointer, device_index)


@functools.cache
def _device_attributes(device_index: int) -> dict[str, int]:
    import cupy

    return cupy.cuda.Device(device_index).attributes


def multiprocessor_count(device_index: int) -> int:
    return _device_attributes(device_index)["MultiProcessorCount"]


# Registers go to warps in pieces of 256; the runtime keeps 1 KiB of shared
# memory per block for itself.
REGISTER_ALLOCATION_UNIT = 256
RESERVED_SHARED_BYTES_PER_BLOCK = 1024


def shared_bytes_limiting_residency(blocks_per_multiprocessor: int, device_index: int) -> int:
    """Dynamic shared memory per block that lets at most this many blocks
    share a multiprocessor."""
    per_multiprocessor = _device_attributes(device_index)["MaxSharedMemoryPerMultiprocessor"]
    return per_multiprocessor // blocks_per_multiprocessor - RESERVED_SHARED_BYTES_PER_BLOCK


@functools.cache
def resident_blocks(kernel: cupy.RawKernel, threads: int, shared_bytes: int, device_index: int) -> int:
    """How many blocks of `kernel` run at once on the whole device: the
    occupancy rule over its registers, its shared memory and the thread and
    block limits of a multiprocessor."""
    attributes = _device_attributes(device_index)
    warps = -(-threads // 32)
    registers_per_warp = -(-kernel.num_regs * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    per_multiprocessor = min(
        attributes["MaxRegistersPerMultiprocessor"] // max(1, warps * registers_per_warp),
        attributes["MaxSharedMemoryPerMultiprocessor"] // (shared_bytes + RESERVED_SHARED_BYTES_PER_BLOCK),
        attributes["MaxThreadsPerMultiProcessor"] // threads,
        attributes["MaxBlocksPerMultiprocessor"],
    )
    return multiprocessor_count(device_index) * max(1, per_multiprocessor)


def launch(
    kernel: cupy.RawKernel,
    device: torch.device,
    grid: tuple[int, ...],
    block: tuple[int, ...],
    args: tuple[Any, ...],
    shared_bytes: int = 0,
) -> None:
    """Launch on torch's current stream of `device`, so the kernel orders with
    torch's work and is recorded when that stream is being captured into a
    CUDA graph."""
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _external_stream(index, torch.cuda.current_stream(index).cuda_stream)
    with cupy.cuda.Device(index), stream:
        kernel(grid, block, args, shared_mem=shared_bytes)
