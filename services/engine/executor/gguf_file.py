"""A GGUF file's metadata and tensors, read in one pass over its header.

The gguf package's GGUFReader builds a numpy view for every element of every
metadata array: for the tokenizer arrays of the embedded model (49k tokens,
48k merges) that is four seconds of each engine start on a 2-core CPU. Here
the header is read with struct over a memory map, in tens of milliseconds;
the gguf package still supplies the type tables and the dequantization, and
the tensors come out as its reader gives them (so `gguf.dequantize` takes
them as they are)."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32  # when the file has no general.alignment

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}  # fmt: skip
# Tensor types stored as plain elements; the rest (block-quantized, bf16) as bytes per row.
_ELEMENT_TYPES = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}  # fmt: skip


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    # Read-only view of the file: elements shaped [..., columns] for plain
    # types, bytes shaped [..., bytes per row] for the others.
    data: np.ndarray


class GGUFFile:
    """`metadata`: every key with its value (str, int, float, bool, or a list
    of them for arrays); `tensors`: in file order, their data mapped from the
    file."""

    def __init__(self, path: str | Path):
        self._offset = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: list[GGUFTensor] = []
        try:
            with open(path, "rb") as file:
                self._buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError when empty
            self._read()
        except (struct.error, ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a readable GGUF file: {error}") from error

    def _read(self) -> None:
        magic = self._buffer[:4]
        if magic != MAGIC:
            raise ValueError(f"it starts with {magic!r}, not {MAGIC!r}")
        self._offset = 4
        version = self._scalar("<I")
        if version not in SUPPORTED_VERSIONS:
            byte_order = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise ValueError(f"version {version}{byte_order}; versions {SUPPORTED_VERSIONS} are read")
        tensor_count, field_count = self._scalar("<Q"), self._scalar("<Q")
        for _ in range(field_count):
            key = self._string()
            self.metadata[key] = self._value(GGUFValueType(self._scalar("<I")))
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-self._offset // alignment) * alignment
        self.tensors = [self._tensor(name, dims, tensor_type, data_start + offset) for name, dims, tensor_type, offset in infos]

    def _scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._buffer, self._offset)
        self._offset += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._scalar("<Q")
        end = self._offset + length
        if end > len(self._buffer):
            raise ValueError(f"a string of {length} bytes runs past the end of the file")
        text = self._buffer[self._offset : end].decode("utf-8")
        self._offset = end
        return text

    def _value(self, value_type: GGUFValueType) -> Any:
        if value_type == GGUFValueType.STRING:
            return self._string()
        if value_type != GGUFValueType.ARRAY:
            return self._scalar(_SCALAR_FORMATS[value_type])
        item_type, count = GGUFValueType(self._scalar("<I")), self._scalar("<Q")
        if item_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[item_type]
            items = np.frombuffer(self._buffer, dtype=np.dtype(fmt), count=count, offset=self._offset)
            self._offset += items.nbytes
            return items.tolist()
        return [self._value(item_type) for _ in range(count)]

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._string()
        dims = tuple(self._scalar("<Q") for _ in range(self._scalar("<I")))
        return name, dims, GGMLQuantizationType(self._scalar("<I")), self._scalar("<Q")

    def _tensor(self, name: str, dims: tuple[int, ...], tensor_type: GGMLQuantizationType, offset: int) -> GGUFTensor:
        shape = dims[::-1]  # GGUF lists the fastest-varying dimension first
        elements = int(np.prod(dims))
        if tensor_type in _ELEMENT_TYPES:
            dtype, count = np.dtype(_ELEMENT_TYPES[tensor_type]), elements
        else:
            block_size, type_size = GGML_QUANT_SIZES[tensor_type]
            dtype, count, shape = np.dtype(np.uint8), elements // block_size * type_size, quant_shape_to_byte_shape(shape, tensor_type)
        if offset + count * dtype.itemsize > len(self._buffer):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        return GGUFTensor(name, tensor_type, np.frombuffer(self._buffer, dtype=dtype, count=count, offset=offset).reshape(shape))
