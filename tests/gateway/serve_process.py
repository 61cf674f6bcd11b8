"""`pagewire serve` as a real child process on free ports, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0


@dataclass
class ServeProcess:
    log_path: Path
    extra_args: list[str]
    ports: dict[str, int] = field(default_factory=lambda: {name: free_port() for name in ("port", "http_port", "tokenizer_port", "engine_port")})
    process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    @property
    def engine_target(self) -> str:
        return f"127.0.0.1:{self.ports['engine_port']}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http_port']}"

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        flags = [part for name, port in self.ports.items() for part in ("--" + name.replace("_", "-"), str(port))]
        command = [sys.executable, "-m", "pagewire.services.cli", "serve", *flags, *self.extra_args, "--log-format", "json"]
        # Every setting comes from flags or extra_env, not from a developer's PAGEWIRE_* variables.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PAGEWIRE_")} | (extra_env or {})
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the launcher itself says it is serving: the gateway can
        answer health a poll interval before the launcher has seen it, and a
        child lost in that window counts as a start-up failure."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while not self.events("pagewire is serving"):
            if self.process.poll() is not None:
                raise AssertionError(f"pagewire serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"pagewire serve not SERVING after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.3)

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def events(self, event: str) -> list[dict[str, Any]]:
        """The launcher's own log records named `event`."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("service") == "serve" and record.get("event") == event:
                records.append(record)
        return records
