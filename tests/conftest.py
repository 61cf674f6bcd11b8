"""Shared fixtures. The embedded model and its tokenizer load once per test run."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from pagewire.services.common.model import ModelSource, load_hf_tokenizer, resolve_model
from pagewire.services.common.tls import TlsFiles


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def self_signed_certificate(directory: Path, dns_name: str, ip: str | None = None) -> TlsFiles:
    """A self-signed certificate valid for dns_name (and ip, if given)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    names = f"DNS:{dns_name}" + (f",IP:{ip}" if ip else "")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-subj", f"/CN={dns_name}", "-addext", f"subjectAltName={names}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return TlsFiles(cert, key)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A self-signed certificate for localhost and 127.0.0.1."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"), "localhost", "127.0.0.1")
