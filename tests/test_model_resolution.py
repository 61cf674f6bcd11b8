from __future__ import annotations

from pathlib import Path

import pytest

from pagewire.services.common.model import EMBEDDED_GGUF, ModelNotFoundError, load_hf_tokenizer, resolve_model, tokenizer_cache_directory


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


SAMPLE_TEXTS = ["Hello world", "def f(x):\n    return x  # ünïcödé 🙂", "  spaces\t\ttabs", "<|im_start|>user\nhi<|im_end|>", ""]


def _behaviour(tokenizer) -> tuple:  # type: ignore[no-untyped-def]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    encoded = [tokenizer(text)["input_ids"] for text in SAMPLE_TEXTS]
    return (
        encoded,
        [tokenizer.decode(ids) for ids in encoded],
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        tokenizer.get_vocab(),
        tokenizer.all_special_ids,
        (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id),
    )


def test_a_gguf_tokenizer_is_converted_once_and_the_cached_copy_behaves_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first load converts the GGUF vocabulary and keeps the result; the
    next loads read the kept files and tokenize, decode and template alike."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = resolve_model(None)
    cached = tokenizer_cache_directory(source)
    assert cached.is_relative_to(tmp_path) and not cached.exists()
    converted = load_hf_tokenizer(source)
    assert (cached / "tokenizer.json").is_file()
    assert not [path for path in cached.parent.iterdir() if path.name.startswith(".staging-")]
    assert _behaviour(load_hf_tokenizer(source)) == _behaviour(converted)


def test_a_cache_that_cannot_be_written_only_costs_the_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    tokenizer = load_hf_tokenizer(resolve_model(None))
    assert tokenizer.eos_token_id is not None


def test_a_damaged_cached_tokenizer_is_converted_again_and_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = resolve_model(None)
    cached = tokenizer_cache_directory(source)
    cached.mkdir(parents=True)
    (cached / "tokenizer.json").write_text("{not json")
    tokenizer = load_hf_tokenizer(source)
    assert tokenizer("Hello world")["input_ids"]
    assert _behaviour(load_hf_tokenizer(source)) == _behaviour(tokenizer)  # the replaced files load
