"""TLS for the public ports: one PEM certificate chain and private key serve
both the gRPC and the REST listener."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class TlsFiles:
    cert_path: Path
    key_path: Path

    @classmethod
    def from_options(cls, tls_cert: str, tls_key: str) -> TlsFiles | None:
        """None when neither is set; SystemExit when only one is, or a file is unreadable."""
        if not tls_cert and not tls_key:
            return None
        if not (tls_cert and tls_key):
            raise SystemExit("--tls-cert and --tls-key go together: give both or neither")
        files = cls(Path(tls_cert), Path(tls_key))
        for path in (files.cert_path, files.key_path):
            if not path.is_file():
                raise SystemExit(f"TLS file not found: {path}")
        return files

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_path.read_bytes(), self.cert_path.read_bytes())])

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments of `uvicorn.Config` that turn on HTTPS."""
        return {"ssl_certfile": str(self.cert_path), "ssl_keyfile": str(self.key_path)}
