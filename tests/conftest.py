"""Shared fixtures. The embedded model and its tokenizer load once per test run."""

from __future__ import annotations

import pytest

from pagewire.services.common.model import ModelSource, load_hf_tokenizer, resolve_model
from pagewire.services.common.tls import TlsFiles
from tests.support.certificates import self_signed_certificate


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def model_source() -> ModelSource:
    return resolve_model(None)


@pytest.fixture(scope="session")
def hf_tokenizer(model_source: ModelSource):
    return load_hf_tokenizer(model_source)


@pytest.fixture(scope="session")
def hf_model(model_source: ModelSource):
    """The embedded model in transformers, float32 on the CPU: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_source.directory), dtype=torch.float32, **model_source.pretrained_kwargs())
    return model.eval()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A self-signed certificate for localhost and 127.0.0.1."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"), "localhost", "127.0.0.1")
