"""pagewire as child processes on free loopback ports, for the tests and the
benchmarks alike: `pagewire serve` (ServeProcess), one service or a stand-in
for it (ServiceProcess), or a tokenizer, an engine and a gateway wired to
each other (Cluster). Each is started, waited on until it serves, stopped
(SIGTERM, then SIGKILL after a grace period), and the tail of its log goes
into every failure message."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import grpc

from pagewire.services.common.config import ENV_PREFIX
from pagewire.services.common.grpc_utils import check_health
from pagewire.v1 import engine_pb2, engine_pb2_grpc, gateway_pb2, tokenizer_pb2

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
CLI = [sys.executable, "-m", "pagewire.services.cli"]
# A cold engine start loads and dequantizes the model on a 2-core CPU.
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
SERVE_PORTS = ("port", "http_port", "tokenizer_port", "engine_port")

# Readiness of a service is reported under its full gRPC service name.
READINESS_SERVICE = {
    "tokenizer": tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name,
    "engine": engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name,
    "gateway": gateway_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def free_port_run(count: int) -> int:
    """A free port whose next count-1 ports are free too (for a service's
    workers on consecutive ports)."""
    while True:
        first = free_port()
        try:
            for port in range(first + 1, first + count):
                with socket.socket() as sock:
                    sock.bind((LOOPBACK, port))
            return first
        except OSError:
            continue


def serve_ports() -> dict[str, int]:
    """Free ports for `pagewire serve`, with room after the tokenizer's for
    as many tokenizer workers as serve starts by default at most (8)."""
    return {name: free_port() for name in SERVE_PORTS} | {"tokenizer_port": free_port_run(8)}


def child_environment() -> dict[str, str]:
    """The caller's environment less its PAGEWIRE_* variables: a child gets
    only the settings its test or benchmark gives it."""
    return {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float, interval_s: float = 0.1) -> float:
    """Seconds until condition() held; TimeoutError naming `what` if it did not within timeout_s."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting until {what}")
        time.sleep(interval_s)
    return time.monotonic() - started


def engine_stats(address: str) -> engine_pb2.EngineStats:
    """The counters of the engine at `address` (its Stats RPC)."""
    with grpc.insecure_channel(address) as channel:
        return engine_pb2_grpc.EngineStub(channel).Stats(engine_pb2.EngineStatsRequest(), timeout=10)


@dataclass(kw_only=True)
class ChildProcess:
    """A child process whose output goes to log_path, appended to on every
    start; the log's name stands for the process in failure messages.
    Subclasses say what runs and when it serves."""

    log_path: Path
    # Settings on top of child_environment().
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    starts: int = field(default=0, init=False)

    def command(self) -> list[str]:
        raise NotImplementedError

    def serving(self) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.log_path.name} was never started"
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.alive, f"{self.log_path.name} is already running"
        self.starts += 1
        command = self.command()
        # JSON log lines, as deployments configure them and ServeProcess.events reads them.
        env = child_environment() | {f"{ENV_PREFIX}LOG_FORMAT": "json"} | self.env
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}: {' '.join(command)}\n".encode())
            # Before the child writes to the same file.
            log.flush()
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float) -> float:
        """As the module's wait_until, but failing at once if the process
        exits first, and with the log's tail in either failure."""

        def alive_and_holds() -> bool:
            if not self.alive:
                returncode = self.process.returncode if self.process else None
                raise RuntimeError(f"{self.log_path.name}: exited with {returncode} before {what}:\n{self.log_tail()}")
            return condition()

        try:
            return wait_until(alive_and_holds, what, timeout_s, interval_s=0.2)
        except TimeoutError as exc:
            raise TimeoutError(f"{self.log_path.name}: {exc}:\n{self.log_tail()}") from None

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Seconds until it serves."""
        return self.wait_until(self.serving, "it serves", timeout_s)

    def wait_exit(self, timeout_s: float) -> int:
        """The exit status once it exits by itself; stopped, and
        subprocess.TimeoutExpired raised, if it does not within timeout_s."""
        assert self.process is not None
        try:
            return self.process.wait(timeout_s)
        finally:
            self.stop()

    @contextmanager
    def running(self) -> Iterator[Self]:
        """Started and serving for the with block, stopped after it."""
        self.start()
        try:
            self.wait_serving()
            yield self
        finally:
            self.stop()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """kill -9, and reap."""
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(STOP_TIMEOUT_S)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit status
        (None if it never started)."""
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
class ServiceProcess(ChildProcess):
    """`pagewire NAME` for NAME a service (tokenizer, engine, gateway), on
    ports that stay the same across restarts; it serves once its
    grpc.health.v1 readiness says SERVING."""

    name: str
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    # The gateway's REST port (a free one unless given); the other services have none.
    http_port: int | None = None
    # PEM roots to trust when the service serves TLS.
    root_certificates: bytes | None = None
    # What runs instead of `pagewire NAME`: a stand-in for the service that
    # takes its --host and --port flags.
    program: list[str] | None = None

    def __post_init__(self) -> None:
        if self.name == "gateway" and self.http_port is None:
            self.http_port = free_port()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def rest_url(self) -> str:
        assert self.http_port is not None, f"{self.name} has no REST port"
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def readiness_service(self) -> str:
        return READINESS_SERVICE[self.name]

    def command(self) -> list[str]:
        ports = ["--host", LOOPBACK, "--port", str(self.port)]
        if self.http_port is not None:
            ports += ["--http-port", str(self.http_port)]
        return [*(self.program or [*CLI, self.name]), *ports, *self.args]

    def serving(self) -> bool:
        return check_health(self.address, self.readiness_service, timeout_s=1.0, root_certificates=self.root_certificates)


@dataclass
class ServeProcess(ChildProcess):
    """`pagewire serve` on free ports. It serves once the launcher logs that
    it does, not once the gateway's health says SERVING: the launcher's own
    probe sees that a poll interval later, and a child lost in between counts
    as a start-up failure."""

    args: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=serve_ports)

    @property
    def grpc_target(self) -> str:
        return f"{LOOPBACK}:{self.ports['port']}"

    @property
    def engine_target(self) -> str:
        return f"{LOOPBACK}:{self.ports['engine_port']}"

    @property
    def rest_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['http_port']}"

    def command(self) -> list[str]:
        flags = [part for name, port in self.ports.items() for part in ("--" + name.replace("_", "-"), str(port))]
        return [*CLI, "serve", *flags, *self.args]

    def serving(self) -> bool:
        return bool(self.events("pagewire is serving"))

    def events(self, event: str, service: str = "serve") -> list[dict[str, Any]]:
        """The log records named `event` of `service`: the launcher's own by default."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("service") == service and record.get("event") == event:
                records.append(record)
        return records


def start_all(processes: Iterable[ServiceProcess]) -> None:
    """Start whichever is not running, then wait until every one serves:
    they start side by side, and a gateway waits for its peers by itself."""
    waited = list(processes)
    for process in waited:
        if not process.alive:
            process.start()
    for process in waited:
        process.wait_serving()


def stop_all(processes: Iterable[ServiceProcess]) -> None:
    """Gateways first: an engine drains until the streams to it close."""
    for process in sorted(processes, key=lambda p: p.name != "gateway"):
        process.stop()


@dataclass
class Cluster:
    """A tokenizer, an engine and a gateway wired to each other."""

    tokenizer: ServiceProcess
    engine: ServiceProcess
    gateway: ServiceProcess

    @classmethod
    def create(
        cls,
        log_dir: Path,
        tokenizer_args: Sequence[str] = (),
        engine_args: Sequence[str] = (),
        gateway_args: Sequence[str] = (),
        engine_program: list[str] | None = None,
    ) -> Cluster:
        tokenizer = ServiceProcess("tokenizer", [*tokenizer_args], log_path=log_dir / "tokenizer.log")
        engine = ServiceProcess("engine", [*engine_args], log_path=log_dir / "engine.log", program=engine_program)
        gateway_flags = ["--tokenizer", tokenizer.address, "--engine", engine.address, *gateway_args]
        return cls(tokenizer, engine, ServiceProcess("gateway", gateway_flags, log_path=log_dir / "gateway.log"))

    @property
    def services(self) -> list[ServiceProcess]:
        return [self.tokenizer, self.engine, self.gateway]

    @property
    def rest_url(self) -> str:
        return self.gateway.rest_url

    def start(self) -> None:
        """Start whatever is not running (a test before may have killed one), and wait until all serve."""
        start_all(self.services)

    def stop(self) -> None:
        stop_all(self.services)

    @contextmanager
    def running(self) -> Iterator[Self]:
        """Started and serving for the with block, stopped after it."""
        try:
            self.start()
            yield self
        finally:
            self.stop()
