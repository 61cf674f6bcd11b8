"""Real pagewire processes on loopback ports for the reliability tests: each
service runs as `python -m pagewire.services.cli <service>`, is waited on until its
grpc.health.v1 readiness says SERVING, and can be killed (any signal) and
started again on the same port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pagewire.services.common.config import ENV_PREFIX
from pagewire.services.common.grpc_utils import check_health
from tests.conftest import free_port

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
# A cold engine start loads and dequantizes the model on a 2-core CPU.
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0


class ServiceExited(RuntimeError):
    pass


@dataclass
class ServiceProcess:
    """One service process; its port stays the same across restarts."""

    name: str
    readiness_service: str
    args: list[str]
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    # PEM roots to trust when the service serves TLS.
    root_certificates: bytes | None = None
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> None:
        assert not self.alive, f"{self.name} is already running"
        self.starts += 1
        # Only the settings given here: none leak in from the caller's environment.
        env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
        env.update({f"{ENV_PREFIX}LOG_FORMAT": "json", **self.env})
        command = [sys.executable, "-m", "pagewire.services.cli", self.name, "--host", LOOPBACK, "--port", str(self.port), *self.args]
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}: {' '.join(command)}\n".encode())
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Seconds until readiness reported SERVING; ServiceExited if the process died first."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if not self.alive:
                raise ServiceExited(f"{self.name} exited with {self.process and self.process.returncode}:\n{self.log_tail()}")
            if check_health(self.address, self.readiness_service, timeout_s=1.0, root_certificates=self.root_certificates):
                return time.monotonic() - started
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not SERVING after {timeout_s:.0f} s:\n{self.log_tail()}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """kill -9, and reap."""
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(STOP_TIMEOUT_S)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit status."""
        if self.process is None:
            return None
        if self.alive:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Cluster:
    """A tokenizer, an engine and a gateway wired to each other."""

    tokenizer: ServiceProcess
    engine: ServiceProcess
    gateway: ServiceProcess
    http_port: int

    @classmethod
    def create(cls, log_dir: Path, engine_args: list[str], gateway_args: list[str]) -> Cluster:
        tokenizer = ServiceProcess("tokenizer", "pagewire.v1.Tokenizer", [], log_dir)
        engine = ServiceProcess("engine", "pagewire.v1.Engine", ["--device", "cpu", *engine_args], log_dir)
        http_port = free_port()
        gateway = ServiceProcess(
            "gateway",
            "pagewire.v1.Generation",
            ["--http-port", str(http_port), "--tokenizer", tokenizer.address, "--engine", engine.address, *gateway_args],
            log_dir,
        )
        return cls(tokenizer, engine, gateway, http_port)

    @property
    def services(self) -> list[ServiceProcess]:
        return [self.tokenizer, self.engine, self.gateway]

    @property
    def rest_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def start(self) -> None:
        for service in self.services:
            service.start()
        for service in self.services:
            service.wait_serving()

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def ensure_serving(self) -> None:
        """Start whatever a previous test left dead, then wait for all to be ready."""
        for service in self.services:
            if not service.alive:
                service.start()
        for service in self.services:
            service.wait_serving()
