"""Self-signed certificates for the tests that serve TLS."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pagewire.services.common.tls import TlsFiles


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
