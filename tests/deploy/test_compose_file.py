"""compose.yaml agrees with the CLI: commands, PAGEWIRE_* variables, ports,
healthchecks and dependencies, in both the cpu and gpu profiles."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from pagewire.services.gateway.discovery import DnsTarget, parse_target
from tests.deploy.compose import COMPOSE_FILE, compose_config, engine_services, network_names
from tests.deploy.contract import config_for, parse_health_command
from tests.support.harness import READINESS_SERVICE

PROFILES = ["cpu", "gpu"]


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


# Ids are not the bare profile names: a test keyword "gpu" marks GPU-only tests.
@pytest.fixture(scope="module", params=PROFILES, ids=lambda name: f"{name}-profile")
def project(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param, compose_config(request.param)


def test_the_file_parses_and_names_its_services() -> None:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert {"tokenizer", "engine", "engine-2", "gateway"} <= set(document["services"])


def test_each_profile_runs_two_engines_of_one_kind(project: tuple[str, dict[str, Any]]) -> None:
    profile, resolved = project
    engines = engine_services(resolved)
    assert set(resolved["services"]) == {"tokenizer", "gateway", *engines}
    assert len(engines) == 2
    answered = [network_names(name, service) for name, service in engines.items()]
    assert {"engine", "engine-2"} == {n for names in answered for n in names if n in ("engine", "engine-2")}
    for name, service in engines.items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        config = config_for(service["command"], service["environment"])
        if profile == "gpu":
            (device,) = devices
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
            assert config.device == "cuda"
        else:
            assert not devices, name
            assert config.device == "cpu"
    if profile == "gpu":
        pinned = [service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for service in engines.values()]
        assert pinned[0] != pinned[1], "two GPU replicas on one device would compete for its memory"


def test_the_tensor_parallel_profile_runs_one_engine_over_two_gpus() -> None:
    resolved = compose_config("gpu-tp2")
    (service,) = engine_services(resolved).values()
    config = config_for(service["command"], service["environment"])
    assert config.device == "cuda" and config.tensor_parallel_size == 2
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert len(device["device_ids"]) == config.tensor_parallel_size
    assert "engine" in network_names("engine-tp2", service)
    assert resolved["services"]["gateway"]["depends_on"]["engine-tp2"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service_name", ["tokenizer", "engine", "gateway"])
def test_service_agrees_with_cli(project: tuple[str, dict[str, Any]], service_name: str) -> None:
    _, resolved = project
    candidates = [s for s in resolved["services"].values() if s["command"][0] == service_name]
    assert candidates
    for service in candidates:
        config = config_for(service["command"], service["environment"])
        assert config.host == "0.0.0.0", "other containers reach this one by its network address"

        health = service["healthcheck"]
        assert health["test"][0] == "CMD"
        args = parse_health_command(health["test"][1:])
        host, port = args.target.rsplit(":", 1)
        assert host in ("127.0.0.1", "localhost")
        assert int(port) == config.port
        assert args.service == READINESS_SERVICE[service_name]
        assert duration_s(health["timeout"]) >= args.timeout

        assert duration_s(service["stop_grace_period"]) > config.shutdown_grace_s, "draining must end before compose's SIGKILL"


def test_gateway_addresses_the_tokenizer_and_every_engine(project: tuple[str, dict[str, Any]]) -> None:
    _, resolved = project
    services = resolved["services"]
    gateway = services["gateway"]
    config = config_for(gateway["command"], gateway["environment"])

    tokenizer_config = config_for(services["tokenizer"]["command"], services["tokenizer"]["environment"])
    assert config.tokenizer == [f"tokenizer:{tokenizer_config.port}"]

    engines = engine_services(resolved)
    targets = [parse_target(t) for t in config.engine]
    assert all(isinstance(t, DnsTarget) for t in targets), "DNS targets follow `--scale` replicas"
    for name, service in engines.items():
        engine_config = config_for(service["command"], service["environment"])
        assert any(t.host in network_names(name, service) and t.port == engine_config.port for t in targets), name

    published = {p["target"]: int(p["published"]) for p in gateway["ports"]}
    assert published == {config.port: 50051, config.http_port: 8000}


def test_gateway_waits_for_healthy_dependencies(project: tuple[str, dict[str, Any]]) -> None:
    _, resolved = project
    services = resolved["services"]
    depends_on = services["gateway"]["depends_on"]
    assert depends_on["tokenizer"] == {"condition": "service_healthy", "required": True}
    for name in engine_services(resolved):
        assert depends_on[name]["condition"] == "service_healthy"
    for name, dependency in depends_on.items():
        if name in services:
            assert "healthcheck" in services[name], name
        else:
            assert dependency["required"] is False, f"{name} belongs to another profile and must be optional"


def test_a_mounted_model_reaches_tokenizer_and_engines() -> None:
    resolved = compose_config("cpu", {"PAGEWIRE_MODEL": "/models/Qwen2.5-0.5B-Instruct", "PAGEWIRE_MODELS_DIR": "/srv/models"})
    loaders = {name: s for name, s in resolved["services"].items() if s["command"][0] in ("tokenizer", "engine")}
    assert len(loaders) == 3
    for name, service in loaders.items():
        config = config_for(service["command"], service["environment"])
        assert config.model == "/models/Qwen2.5-0.5B-Instruct", name
        (volume,) = service["volumes"]
        assert (volume["source"], volume["target"], volume["read_only"]) == ("/srv/models", "/models", True), name
