from __future__ import annotations

from pathlib import Path

import pytest

from pagewire.services.common.model import EMBEDDED_GGUF, ModelNotFoundError, resolve_model


def test_default_is_the_embedded_gguf() -> None:
    source = resolve_model(None)
    assert source.gguf_file == EMBEDDED_GGUF
    assert (source.directory / EMBEDDED_GGUF).is_file()


def test_gguf_file_and_hf_directory(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)).gguf_file == "tiny.gguf"
    (tmp_path / "config.json").write_text("{}")
    source = resolve_model(str(tmp_path))
    assert source.gguf_file is None and source.directory == tmp_path.resolve()


def test_unknown_model_is_refused_with_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither a .gguf file nor a HF directory"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError):
        resolve_model("HuggingFaceTB/SmolLM2-135M")  # hub ids are never downloaded
