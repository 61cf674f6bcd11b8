"""Deployment topologies run as local processes: each container or pod becomes
a `pagewire` process on a free loopback port, with the environment its
deployment file gives it, and addresses that named containers or Services
rewritten to those ports."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from pagewire.v1 import engine_pb2, engine_pb2_grpc
from tests.conftest import free_port
from tests.deploy.contract import READINESS_SERVICE
from tests.reliability.harness import LOOPBACK, ServiceProcess

REQUEST_TIMEOUT_S = 60.0


def rewrite_addresses(value: str, addresses: Mapping[str, str]) -> str:
    """`value` with each NAME:PORT key of `addresses` (a container or Service
    address) replaced by its loopback stand-in."""
    for name_port, loopback in addresses.items():
        value = re.sub(rf"(?<![\w.-]){re.escape(name_port)}(?!\d)", loopback, value)
    return value


def resolve_mounts(value: str, mounts: Mapping[str, Path]) -> str:
    """`value` with a path inside a mounted volume (container path -> host
    directory) turned into the host path, as the mount would show it."""
    for target, source in mounts.items():
        if value == target or value.startswith(target.rstrip("/") + "/"):
            return str(source) + value[len(target.rstrip("/")) :]
    return value


def service_process(name: str, command: list[str], environment: Mapping[str, str], log_dir: Path) -> ServiceProcess:
    """The process standing in for one container: `pagewire COMMAND` with its
    environment; the loopback host and a free port come as flags, which beat
    the PAGEWIRE_HOST/PAGEWIRE_PORT the container would bind."""
    subcommand, *args = command
    if subcommand == "gateway":
        args = [*args, "--http-port", str(free_port())]
    directory = log_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    return ServiceProcess(subcommand, READINESS_SERVICE[subcommand], args, directory, env=dict(environment))


def http_port(gateway: ServiceProcess) -> int:
    return int(gateway.args[gateway.args.index("--http-port") + 1])


def start_all(processes: Iterable[ServiceProcess]) -> None:
    started = list(processes)
    for process in started:
        process.start()
    for process in started:
        process.wait_serving()


def stop_all(processes: Iterable[ServiceProcess]) -> None:
    """Gateways first: an engine drains until the streams to it close."""
    ordered = sorted(processes, key=lambda p: p.name != "gateway")
    for process in ordered:
        process.stop()


def engine_stats(engine: ServiceProcess) -> engine_pb2.EngineStats:
    with grpc.insecure_channel(engine.address) as channel:
        return engine_pb2_grpc.EngineStub(channel).Stats(engine_pb2.EngineStatsRequest(), timeout=10)


def finished_requests(engine: ServiceProcess) -> int:
    return engine_stats(engine).requests_finished_total


def complete(client: httpx.Client, prompt: str, max_tokens: int = 4, ignore_eos: bool = False) -> dict[str, Any]:
    """One completion through the gateway's REST API; raises unless it succeeds."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos}
    response = client.post("/v1/completions", json=body)
    response.raise_for_status()
    completion = response.json()
    assert completion["choices"][0]["finish_reason"] in ("stop", "length"), completion
    return completion


def rest_client(gateway: ServiceProcess) -> httpx.Client:
    return httpx.Client(base_url=f"http://{LOOPBACK}:{http_port(gateway)}", timeout=REQUEST_TIMEOUT_S)


def complete_concurrently(gateway: ServiceProcess, prompts: list[str], concurrency: int = 8) -> None:
    with rest_client(gateway) as client:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda prompt: complete(client, prompt), prompts))


@dataclass
class SteadyLoad:
    """Requests sent back to back from a few threads until stopped, with
    every failure kept."""

    gateway: ServiceProcess
    threads: int = 3
    succeeded: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _send(self, worker: int) -> None:
        with rest_client(self.gateway) as client:
            sent = 0
            while not self._stop.is_set():
                sent += 1
                try:
                    complete(client, f"Worker {worker} asks question {sent}: what comes after {sent}?")
                except (httpx.HTTPError, AssertionError) as exc:
                    detail = exc.response.text if isinstance(exc, httpx.HTTPStatusError) else repr(exc)
                    with self._lock:
                        self.failures.append(detail)
                else:
                    with self._lock:
                        self.succeeded += 1

    def __enter__(self) -> SteadyLoad:
        self._workers = [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(REQUEST_TIMEOUT_S)
