"""Compiles this package's CUDA sources with NVRTC through CuPy at first use
and launches them on torch memory, on torch's current stream.

CuPy keeps compiled binaries on disk (~/.cupy/kernel_cache), so a source is
compiled once per machine; the functions here keep each loaded kernel for the
life of the process. CuPy is imported lazily: the CPU paths of pagewire never
need it."""

from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import torch

if TYPE_CHECKING:
    import cupy

log = structlog.get_logger()

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
    CUDA graph. Recorded into a graph on sm_90+, the launch is a
    programmatic dependent of the kernel before it
    (kernels/grid_dependency.cuh: every kernel here first waits for that one
    to finish): a replayed decode step is a chain of short kernels whose
    launch gaps that hides. Launched eagerly, the host's launch is the gap,
    and CuPy's launch costs the host less than the driver call through
    ctypes, so eager launches are ordinary ones."""
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    stream_pointer = torch.cuda.current_stream(index).cuda_stream
    with cupy.cuda.Device(index):
        if torch.cuda.is_current_stream_capturing() and _launch_programmatic(kernel, index, stream_pointer, grid, block, args, shared_bytes):
            return
        with _external_stream(index, stream_pointer):
            kernel(grid, block, args, shared_mem=shared_bytes)


# cuLaunchKernelEx's configuration (cuda.h: CUlaunchConfig, CUlaunchAttribute).
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
# Kernel arguments are numpy scalars of these types (what CuPy's launch takes too).
_ARGUMENT_TYPES = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32, np.float32: ctypes.c_float}


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_uint) for name in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_bytes")),
        ("stream", ctypes.c_void_p),
        ("attributes", ctypes.POINTER(_LaunchAttribute)),
        ("num_attributes", ctypes.c_uint),
    ]


@functools.cache
def _launch_kernel_ex(device_index: int) -> Any | None:
    """The driver's cuLaunchKernelEx where `device_index` takes programmatic
    launches (compute capability 9.0 and up), else None."""
    if torch.cuda.get_device_capability(device_index) < (9, 0):
        return None
    try:
        function = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    except (OSError, AttributeError):
        log.info("this CUDA driver has no cuLaunchKernelEx: kernels launch the ordinary way")
        return None
    function.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


def _launch_programmatic(
    kernel: cupy.RawKernel, device_index: int, stream_pointer: int, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], shared_bytes: int
) -> bool:
    """Whether the kernel was launched as a programmatic dependent."""
    launch_kernel_ex = _launch_kernel_ex(device_index)
    if launch_kernel_ex is None:
        return False
    grid, block = (*grid, 1, 1)[:3], (*block, 1, 1)[:3]
    attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value[0] = 1
    config = _LaunchConfig(*grid, *block, shared_bytes, stream_pointer, ctypes.pointer(attribute), 1)
    values = [_ARGUMENT_TYPES[type(arg)](arg) for arg in args]
    pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(value) for value in values))
    result = launch_kernel_ex(ctypes.byref(config), kernel.kernel.ptr, pointers, None)
    if result != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {result}")
    return True
