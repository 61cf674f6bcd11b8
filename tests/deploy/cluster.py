"""Deployment topologies run as local processes: each container or pod becomes
a `pagewire` process on a free loopback port, with the environment its
deployment file gives it, and addresses that named containers or Services
rewritten to those ports."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.harness import ServiceProcess, engine_stats

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
    """The process standing in for the container `name`: `pagewire COMMAND`
    with its environment; the loopback host and free ports come as flags,
    which beat the PAGEWIRE_HOST/PAGEWIRE_PORT the container would bind."""
    subcommand, *args = command
    return ServiceProcess(subcommand, args, log_path=log_dir / f"{name}.log", env=dict(environment))


def finished_requests(engine: ServiceProcess) -> int:
    return engine_stats(engine.address).requests_finished_total


def complete(client: httpx.Client, prompt: str, max_tokens: int = 4, ignore_eos: bool = False) -> dict[str, Any]:
    """One completion through the gateway's REST API; raises unless it succeeds."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos}
    response = client.post("/v1/completions", json=body)
    response.raise_for_status()
    completion = response.json()
    assert completion["choices"][0]["finish_reason"] in ("stop", "length"), completion
    return completion


def rest_client(gateway: ServiceProcess) -> httpx.Client:
    return httpx.Client(base_url=gateway.rest_url, timeout=REQUEST_TIMEOUT_S)


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
