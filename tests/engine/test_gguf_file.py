"""The engine's GGUF header reader against the gguf package's GGUFReader:
every metadata value and every tensor the same, on a file written here with
every value type and several tensor types, and on the embedded model; a file
that is not GGUF, or is cut short, is refused with its path and the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from pagewire.services.common.model import resolve_model
from pagewire.services.engine.executor.gguf_file import GGUFFile


def _assert_same_as_the_gguf_package(path: Path) -> GGUFFile:
    ours, theirs = GGUFFile(path), GGUFReader(path)
    # Its contents() flattens an array of arrays; the nesting is checked apart.
    expected = {name: field.contents() for name, field in theirs.fields.items() if not name.startswith("GGUF.") and len(field.types) <= 2}
    assert {name: value for name, value in ours.metadata.items() if name in expected} == expected
    assert set(ours.metadata) == {name for name in theirs.fields if not name.startswith("GGUF.")}
    assert [(t.name, t.tensor_type) for t in ours.tensors] == [(t.name, t.tensor_type) for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.data.dtype == reference.data.dtype and mine.data.shape == reference.data.shape, mine.name
        assert np.array_equal(mine.data, reference.data, equal_nan=True), mine.name
    return ours


def test_every_value_type_and_tensor_type_reads_as_the_gguf_package_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "all.gguf"
    writer = GGUFWriter(path, "llama")
    scalars = {
        GGUFValueType.UINT8: 255, GGUFValueType.INT8: -128, GGUFValueType.UINT16: 65535, GGUFValueType.INT16: -32768,
        GGUFValueType.UINT32: 2**32 - 1, GGUFValueType.INT32: -(2**31), GGUFValueType.UINT64: 2**64 - 1,
        GGUFValueType.INT64: -(2**63), GGUFValueType.FLOAT32: 0.5, GGUFValueType.FLOAT64: -1e300, GGUFValueType.BOOL: True,
    }  # fmt: skip
    for value_type, value in scalars.items():
        writer.add_key_value(f"test.{value_type.name.lower()}", value, value_type)
    writer.add_string("test.string", "naïve — ünïcödé")
    writer.add_string("test.empty", "")
    writer.add_array("test.tokens", ["<s>", "", "▁the", "\n", "日本"])
    writer.add_array("test.ints", [3, -1, 7])
    writer.add_array("test.floats", [0.25, -2.0])
    writer.add_array("test.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 5), dtype=np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 3, 4)).astype(np.float16))
    writer.add_tensor("i32", np.arange(6, dtype=np.int32))
    rows = rng.standard_normal((4, 64), dtype=np.float32)
    for tensor_type in (GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0):
        writer.add_tensor(tensor_type.name.lower(), quantize(rows, tensor_type), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = _assert_same_as_the_gguf_package(path)
    assert ours.metadata["test.uint64"] == 2**64 - 1 and ours.metadata["test.tokens"][4] == "日本"
    assert ours.metadata["test.nested"] == [[1, 2], [3]]
    assert [t.name for t in ours.tensors] == ["f32", "f16", "i32", "bf16", "q8_0", "q4_0"]


def test_the_embedded_model_reads_as_the_gguf_package_reads_it() -> None:
    source = resolve_model(None)
    ours = _assert_same_as_the_gguf_package(source.directory / source.gguf_file)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152


def test_a_file_that_is_not_gguf_or_is_cut_short_is_refused_naming_it(tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.safetensors"
    not_gguf.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable GGUF file: it starts with"):
        GGUFFile(not_gguf)
    source = resolve_model(None)
    whole = (source.directory / source.gguf_file).read_bytes()
    for cut in (len(whole) // 2, 100_000, 30, 0):
        short = tmp_path / f"cut_{cut}.gguf"
        short.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=rf"cut_{cut}\.gguf is not a readable GGUF file"):
            GGUFFile(short)
