"""The compose cluster (cpu profile) as local processes: every service's
command with the environment compose resolves for it (serving a model from
the mounted models directory), two engine replicas, container names
rewritten to loopback ports. The gateway spreads requests over both replicas
and keeps serving after one is killed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.cluster import complete_concurrently, finished_requests, resolve_mounts, rewrite_addresses, service_process
from tests.deploy.compose import compose_config, network_names
from tests.deploy.contract import config_for
from tests.support.harness import ServiceProcess, start_all, stop_all


@pytest.fixture(scope="module")
def compose_processes(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[dict[str, ServiceProcess]]:
    services = compose_config("cpu", {"PAGEWIRE_MODEL": "/models/tiny", "PAGEWIRE_MODELS_DIR": str(models_dir)})["services"]
    log_dir: Path = tmp_path_factory.mktemp("compose")
    processes = {}
    for name, service in services.items():
        mounts = {volume["target"]: Path(volume["source"]) for volume in service.get("volumes", [])}
        environment = {key: resolve_mounts(value, mounts) for key, value in service["environment"].items()}
        processes[name] = service_process(name, service["command"], environment, log_dir)
    # What other containers dial (NAME:PORT on the compose network) -> the loopback stand-in.
    loopback = {
        f"{network_name}:{config_for(service['command'], service['environment']).port}": processes[name].address
        for name, service in services.items()
        for network_name in network_names(name, service)
    }
    for process in processes.values():
        process.env = {key: rewrite_addresses(value, loopback) for key, value in process.env.items()}
    try:
        start_all(processes.values())
        yield processes
    finally:
        stop_all(processes.values())


def test_gateway_routes_to_both_replicas_and_survives_losing_one(compose_processes: dict[str, ServiceProcess]) -> None:
    gateway = compose_processes["gateway"]
    engines = [p for p in compose_processes.values() if p.name == "engine"]
    assert len(engines) == 2
    assert all(engine.address in gateway.env["PAGEWIRE_ENGINE"] for engine in engines)

    complete_concurrently(gateway, [f"Tell me a fact about the number {n}." for n in range(16)])
    before = [finished_requests(engine) for engine in engines]
    assert all(count > 0 for count in before), f"requests per replica: {before}"
    assert sum(before) == 16

    killed, survivor = engines
    killed.kill()
    complete_concurrently(gateway, [f"Name a colour that starts with {letter}." for letter in "ABCDEF"])
    assert finished_requests(survivor) == before[1] + 6
